"""gptjax.model.attention's XLA path: the written-out backward and the single-query decode form, against plain
softmax attention differentiated by JAX."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.model import attention


def naive_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS):
    """Repeat kv heads, masked softmax, zero rows with no visible key; autodiff does the backward."""
    G = q_BLHD.shape[2] // k_BSKD.shape[2]
    k_BSHD, v_BSHD = jnp.repeat(k_BSKD, G, axis=2), jnp.repeat(v_BSKD, G, axis=2)
    s_BHLS = jnp.einsum("blhd,bshd->bhls", q_BLHD, k_BSHD) * q_BLHD.shape[-1] ** -0.5
    p_BHLS = jax.nn.softmax(jnp.where(mask_BLS[:, None], s_BHLS, -1e30), axis=-1)
    p_BHLS = p_BHLS * jnp.any(mask_BLS, -1)[:, None, :, None]
    return jnp.einsum("bhls,bshd->blhd", p_BHLS, v_BSHD)


# The computations compared below are jitted: run eagerly, every op compiles on its own (slow on CPU).
naive, cached_attention = jax.jit(naive_attention), jax.jit(attention.cached_attention)


@functools.partial(jax.jit, static_argnums=0)
def values_and_grads(fn, q, k, v, mask, w):
    """fn(q, k, v, mask) and the gradients of sum(fn(q, k, v, mask) * w) in q, k, v: one program."""
    out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
    return out, vjp(w)


def _inputs(L, S, H, K, D, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (2, L, H, D))
    k = jax.random.normal(ks[1], (2, S, K, D))
    v = jax.random.normal(ks[2], (2, S, K, D))
    return q, k, v, jax.random.normal(ks[3], (2, L, H, D))


@pytest.mark.parametrize("H,K", [(4, 4), (4, 2), (6, 1)])
def test_xla_attention_values_and_grads_match_autodiff(H, K):
    L, S = 7, 9
    q, k, v, w = _inputs(L, S, H, K, 8)
    # packed segments, padding (a query row that sees nothing) and bottom-right causal masking
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1] * 7])
    kv_seg = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0, 0], [1] * 9])
    mask = attention.attention_mask(L, S, True, seg, kv_seg)

    out, got = values_and_grads(attention.xla_attention, q, k, v, mask, w)
    out_want, want = values_and_grads(naive_attention, q, k, v, mask, w)
    np.testing.assert_allclose(out, out_want, atol=1e-5)
    for g, r in zip(got, want, strict=True):
        assert float(jnp.abs(r).max()) > 0.1
        np.testing.assert_allclose(g, r, atol=2e-5)
    assert float(jnp.abs(got[0][0, 5:]).max()) == 0.0  # padding queries get no gradient


def test_xla_attention_bf16_grads_close_to_fp32():
    q, k, v, w = _inputs(16, 16, 4, 2, 16, seed=1)
    mask = attention.attention_mask(16, 16, True)

    def grads(dt):
        f = lambda q, k, v: jnp.sum(attention.xla_attention(q, k, v, mask).astype(jnp.float32) * w)  # noqa: E731
        return jax.jit(jax.grad(f, (0, 1, 2)))(q.astype(dt), k.astype(dt), v.astype(dt))

    for g, r in zip(grads(jnp.bfloat16), grads(jnp.float32), strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(g.astype(jnp.float32), r, atol=0.1, rtol=0.05)


def test_causal_chunks_match_one_block():
    """Long causal self-attention runs in query chunks that skip the masked triangle: same values, grads."""
    L = 320
    assert attention.causal_chunks(L, L) == 4 and attention.causal_chunks(L, L + 1) == 1
    q, k, v, w = _inputs(L, L, 4, 2, 8, seed=3)
    seg = jnp.concatenate([jnp.full((2, 100), 1), jnp.full((2, 200), 2), jnp.zeros((2, 20), int)], 1)
    mask = attention.attention_mask(L, L, True, seg)

    def chunked(q, k, v):
        return jnp.sum(attention.attention(q, k, v, impl="xla", causal=True, segment_ids_BL=seg) * w)

    def one_block(q, k, v):
        return jnp.sum(naive_attention(q, k, v, mask) * w)

    got, got_grads = jax.jit(jax.value_and_grad(chunked, (0, 1, 2)))(q, k, v)
    want, want_grads = jax.jit(jax.value_and_grad(one_block, (0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, r in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=2e-5)


@pytest.mark.parametrize("H,K", [(4, 4), (4, 2)])
def test_single_query_cached_attention_matches_general_path(H, K):
    """One query per row (decode) against the kv-head-major cache equals masked attention over the keys,
    and so does a longer chunk at per-row slots (the general path)."""
    S = 11
    q, k, v, _ = _inputs(1, S, H, K, 8, seed=2)
    k_BKDS, v_BKSD = jnp.transpose(k, (0, 2, 3, 1)), jnp.swapaxes(v, 1, 2)  # init_cache's layouts
    pos_B1 = jnp.array([[4], [10]])
    got = cached_attention(q, k_BKDS, v_BKSD, pos_B1)
    mask = pos_B1[:, :, None] >= jnp.arange(S)[None, None]
    np.testing.assert_allclose(got, naive(q, k, v, mask), atol=1e-5)
    # slots past a row's position are never read
    k2 = k_BKDS.at[0, :, :, 5:].set(1e4)
    np.testing.assert_allclose(cached_attention(q, k2, v_BKSD, pos_B1), got, atol=1e-5)
    q3, _, _, _ = _inputs(3, S, H, K, 8, seed=3)
    pos_B3 = jnp.array([[2, 3, 4], [7, 8, 9]])
    mask3 = pos_B3[:, :, None] >= jnp.arange(S)[None, None]
    want = naive(q3, k, v, mask3)
    np.testing.assert_allclose(cached_attention(q3, k_BKDS, v_BKSD, pos_B3), want, atol=1e-5)
