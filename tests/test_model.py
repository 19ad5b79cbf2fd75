"""Model behaviour: causality, packing isolation, GQA, heads, remat, KV-cache decode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model
from gptjax.model import attention

GPT2 = model.ModelConfig.gpt2(vocab_size=97, d_model=64, n_layers=2, n_heads=4, max_len=48)
LLAMA = model.ModelConfig.llama(
    vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_len=48, rope_theta=500.0
)
FAMILIES = {"gpt2": GPT2, "llama": LLAMA}
# Jitted: one compile per config and shape (run eagerly, every op of a forward pass compiles on its own).
apply = jax.jit(model.apply, static_argnums=0)
decode = jax.jit(model.decode, static_argnums=0)


def tokens(shape, seed=0, vocab=97):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def cfg_params(request):
    cfg = FAMILIES[request.param]
    return cfg, model.init(cfg, jax.random.key(1))


def test_param_layout_and_count(cfg_params):
    cfg, params = cfg_params
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes["blocks"]["attn"]["wq"] == (2, 64, 4, 16)
    assert shapes["blocks"]["attn"]["wk"] == (2, 64, cfg.kv_heads, 16)
    assert ("lm_head" in params) == (not cfg.tie_embeddings)
    assert model.num_params(cfg) == sum(x.size for x in jax.tree.leaves(params))
    axes = model.logical_axes(cfg)
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == jax.tree.structure(params)
    assert axes["blocks"]["attn"]["wq"] == ("layers", "embed", "heads", "head_dim")


def test_causality(cfg_params):
    cfg, params = cfg_params
    t = 9
    a = tokens((2, 20), seed=0)
    b = a.at[:, t].set((a[:, t] + 1) % cfg.vocab_size)
    la, lb = apply(cfg, params, a), apply(cfg, params, b)
    np.testing.assert_allclose(la[:, :t], lb[:, :t], atol=1e-6)
    assert float(jnp.abs(la[:, t:] - lb[:, t:]).max()) > 1e-4  # the change is visible from t on


def test_packing_isolation(cfg_params):
    cfg, params = cfg_params
    doc1, doc2 = tokens((1, 7), seed=3), tokens((1, 12), seed=4)
    packed = jnp.concatenate([doc1, doc2, jnp.zeros((1, 5), jnp.int32)], axis=1)
    seg = jnp.array([[1] * 7 + [2] * 12 + [0] * 5])
    out = apply(cfg, params, packed, segment_ids_BL=seg)  # positions restart per segment
    np.testing.assert_allclose(out[:, :7], apply(cfg, params, doc1), atol=2e-5)
    np.testing.assert_allclose(out[:, 7:19], apply(cfg, params, doc2), atol=2e-5)


def test_positions_from_segments():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(model.positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_gqa_matches_repeated_kv_attention():
    B, L, H, K, D = 2, 11, 8, 2, 16
    q = jax.random.normal(jax.random.key(0), (B, L, H, D))
    k = jax.random.normal(jax.random.key(1), (B, L, K, D))
    v = jax.random.normal(jax.random.key(2), (B, L, K, D))
    out = attention.attention(q, k, v, impl="xla", causal=True)
    # explicit multi-head attention with every kv head repeated for its H/K query heads
    k_rep, v_rep = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
    s = jnp.einsum("blhd,bshd->bhls", q, k_rep) / np.sqrt(D)
    s = jnp.where(jnp.tril(jnp.ones((L, L), bool)), s, -jnp.inf)
    ref = jnp.einsum("bhls,bshd->blhd", jax.nn.softmax(s, -1), v_rep)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_gqa_model_equals_mha_with_repeated_kv_weights():
    params = model.init(LLAMA, jax.random.key(5))
    mha = LLAMA.replace(n_kv_heads=None)
    G = LLAMA.n_heads // LLAMA.kv_heads
    mha_params = jax.tree.map(lambda x: x, params)
    for name in ("wk", "wv"):
        mha_params["blocks"]["attn"][name] = jnp.repeat(params["blocks"]["attn"][name], G, axis=2)
    t = tokens((2, 16), seed=7)
    np.testing.assert_allclose(apply(LLAMA, params, t), apply(mha, mha_params, t), atol=2e-5)


def test_fully_masked_rows_are_zero_not_nan():
    q = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
    seg_q = jnp.array([[1, 1, 2, 2]])
    seg_k = jnp.array([[1, 1, 3, 3]])
    out = attention.attention(q, q, q, causal=False, segment_ids_BL=seg_q, kv_segment_ids_BS=seg_k)
    assert not bool(jnp.isnan(out).any())
    np.testing.assert_array_equal(out[:, 2:], 0.0)


def test_scalar_head_zero_init_and_shape():
    cfg = GPT2.replace(head="scalar")
    params = model.init(cfg, jax.random.key(0))
    values = apply(cfg, params, tokens((3, 10)))
    assert values.shape == (3, 10) and values.dtype == jnp.float32
    np.testing.assert_array_equal(values, 0.0)  # zero-initialised value head
    cfg_n = cfg.replace(scalar_head_init="normal")
    assert float(jnp.abs(apply(cfg_n, model.init(cfg_n, jax.random.key(0)), tokens((3, 10)))).max()) > 0


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_changes_nothing_numerically(policy):
    params = model.init(LLAMA, jax.random.key(2))
    t = tokens((2, 12), seed=2)

    def loss(cfg, p):
        return jnp.mean(model.apply(cfg, p, t) ** 2)

    g0 = jax.jit(jax.grad(lambda p: loss(LLAMA, p)))(params)
    g1 = jax.jit(jax.grad(lambda p: loss(LLAMA.replace(remat=policy), p)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_bf16_compute_keeps_fp32_params():
    cfg = LLAMA.replace(dtype="bfloat16")
    params = model.init(cfg, jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    out = apply(cfg, params, tokens((2, 8)))
    ref = apply(LLAMA, params, tokens((2, 8)))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.1)


@pytest.mark.parametrize("prefill", [False, True])
def test_kv_cache_decode_matches_full_forward(cfg_params, prefill):
    """Ragged right-padded prompts: prefill (against the whole cache, or ``prefill=True``: causal attention
    over the prompt alone, as in training), then one token per step at each row's own slot."""
    cfg, params = cfg_params
    seq = tokens((2, 14), seed=11)
    lengths = jnp.array([9, 6])
    cache = model.init_cache(cfg, 2, 16)
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    prompt_logits, cache = model.decode(cfg, params, seq[:, :9], positions, cache, prefill=prefill)
    np.testing.assert_allclose(prompt_logits[0], apply(cfg, params, seq[:1, :9])[0], atol=5e-5)
    for step in range(4):
        pos = lengths + step
        nxt = jnp.take_along_axis(seq, pos[:, None], 1)
        logits, cache = decode(cfg, params, nxt, pos[:, None], cache)
        for b in range(2):
            full = apply(cfg, params, seq[b : b + 1, : int(pos[b]) + 1])
            np.testing.assert_allclose(logits[b, 0], full[0, -1], atol=5e-5)


@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unrolled_layers_match_scanned(family, remat):
    """scan_layers=False (a Python loop over the stacked params) computes the scan's logits and grads."""
    scanned = FAMILIES[family].replace(scan_layers=True, remat=remat)
    unrolled = scanned.replace(scan_layers=False)
    assert scanned.scan and not unrolled.scan
    params = model.init(scanned, jax.random.key(3))
    t, seg = tokens((2, 12), seed=3), jnp.array([[1] * 7 + [2] * 5, [1] * 10 + [0] * 2])

    def loss(cfg, p):
        logits = model.apply(cfg, p, t, segment_ids_BL=seg)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * jnp.arange(12)), logits

    (l0, logits0), g0 = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p), has_aux=True))(params)
    (l1, logits1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p), has_aux=True))(params)
    np.testing.assert_allclose(logits1, logits0, rtol=1e-5, atol=1e-5)
    for path, a in jax.tree_util.tree_leaves_with_path(g0):
        b = g1
        for k in path:
            b = b[k.key]
        # float sums in another order; the key bias's grad is zero up to rounding (softmax ignores it)
        scale = max(1.0, float(jnp.abs(a).max()))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * scale, err_msg=str(path))
    assert float(jnp.abs(g0["blocks"]["mlp"]["w_out"][-1]).max()) > 1e-3  # the last layer gets gradient


def test_decode_unrolled_matches_scanned(cfg_params):
    """The unrolled decode path (per-layer cache buffers, unstacked params) equals the scanned one."""
    cfg, params = cfg_params
    outs = {}
    for scan in (True, False):
        c = cfg.replace(scan_layers=scan)
        p = model.unstack_layers(c, params)
        assert isinstance(p["blocks"], dict) == scan
        cache = model.init_cache(c, 2, 12)
        prompt_logits, cache = decode(
            c, p, tokens((2, 5), seed=4), jnp.broadcast_to(jnp.arange(5), (2, 5)), cache
        )
        pos_B1 = jnp.array([[5], [3]])  # rows at different slots
        logits, cache = decode(c, p, tokens((2, 1), seed=5), pos_B1, cache)
        outs[scan] = (prompt_logits, logits, np.asarray(cache["k"]), np.asarray(cache["v"]))
    for a, b in zip(outs[True], outs[False], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    v_NBKSD = outs[True][3]  # row 1 wrote slot 3 (its decode step) and slot 4 (its prompt)
    assert np.abs(v_NBKSD[:, 1, :, 3]).max() > 0 and np.abs(v_NBKSD[:, 1, :, 4]).max() > 0


def test_config_validation():
    with pytest.raises(ValueError, match="n_kv_heads"):
        model.ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="norm"):
        model.ModelConfig(norm="batchnorm")
