"""Pallas kernels vs plain-jnp references (CPU, Pallas interpreter): flash attention forward and gradients,
decode attention, and the model with attention_impl='pallas' vs 'xla'."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model as model_lib
from gptjax.kernels import decode_attention as da
from gptjax.kernels import flash_attention as fa
from gptjax.model import attention as attn_lib

SMALL = fa.BlockSizes(16, 16, 16, 16, 16, 16)  # many blocks even on tiny inputs


def _rand(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _segments(key, B, L, n_docs=3, pad=True):
    """Sorted ids 1..n_docs with random boundaries, optionally trailing padding (0)."""
    k1, k2 = jax.random.split(key)
    ids = jnp.sort(jax.random.randint(k1, (B, L), 1, n_docs + 1), axis=1)
    if pad:
        n_pad = jax.random.randint(k2, (B, 1), 0, L // 4 + 1)
        ids = jnp.where(jnp.arange(L)[None, :] >= L - n_pad, 0, ids)
    return ids.astype(jnp.int32)


def _err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "kernel produced non-finite values"
    return np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b)))


def _check(B, L, S, H, K, D, causal, seg, dtype, tol, block_sizes=SMALL, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    q, k, v = (
        _rand(ks[0], (B, L, H, D), dtype),
        _rand(ks[1], (B, S, K, D), dtype),
        _rand(ks[2], (B, S, K, D), dtype),
    )
    do = _rand(ks[3], (B, L, H, D), dtype)
    q_seg = kv_seg = None
    if seg:
        q_seg = _segments(ks[4], B, L)
        kv_seg = q_seg if L == S else _segments(ks[5], B, S)
    fn = functools.partial(
        fa.flash_attention,
        causal=causal,
        segment_ids_BL=q_seg,
        kv_segment_ids_BS=kv_seg,
        block_sizes=block_sizes,
    )
    ref = functools.partial(
        fa.flash_attention_reference, causal=causal, segment_ids_BL=q_seg, kv_segment_ids_BS=kv_seg
    )
    up = (lambda x: x.astype(jnp.float32)) if dtype == jnp.bfloat16 else (lambda x: x)

    @jax.jit
    def both(q, k, v, do):
        # bf16 kernels are compared to the fp32 reference on the same (bf16-rounded) inputs.
        out, vjp = jax.vjp(fn, q, k, v)
        out_r, vjp_r = jax.vjp(ref, up(q), up(k), up(v))
        return out, vjp(do), out_r, vjp_r(up(do))

    out, grads, out_r, grads_r = both(q, k, v, do)
    assert out.shape == q.shape and out.dtype == q.dtype
    errs = {"out": _err(out, out_r)}
    for name, g, g_r in zip(("dq", "dk", "dv"), grads, grads_r, strict=True):
        assert g.dtype == dtype
        errs[name] = _err(g, g_r)
    assert max(errs.values()) <= tol, errs
    return out, grads, q_seg


F32, BF16 = 1e-5, 2e-2


@pytest.mark.parametrize(
    "B,L,S,H,K,D,causal,seg",
    [
        (2, 37, 37, 4, 4, 32, True, False),  # odd length, MHA
        (2, 50, 50, 4, 2, 16, False, True),  # GQA 2, packed, non-causal
        (1, 33, 33, 8, 2, 64, True, True),  # GQA 4, packed, causal, head dim 64
        (1, 20, 45, 8, 1, 16, True, False),  # GQA 8 (MQA), q shorter than kv (bottom-right causal)
        (1, 24, 24, 2, 1, 80, False, False),  # head dim 80 (padded to 128 inside)
    ],
)
def test_flash_fp32(B, L, S, H, K, D, causal, seg):
    _check(B, L, S, H, K, D, causal, seg, jnp.float32, F32)


FUSED = dataclasses.replace(SMALL, fused_dq=True)


@pytest.mark.parametrize(
    "B,L,S,H,K,D,causal,seg,dtype",
    [
        (1, 33, 33, 8, 2, 64, True, True, jnp.float32),  # GQA 4, packed, causal: many kv blocks add into dq
        (1, 20, 45, 8, 1, 80, True, False, jnp.float32),  # MQA, q shorter than kv, padded head dim
        (2, 64, 64, 4, 2, 128, True, True, jnp.bfloat16),
    ],
)
def test_flash_fused_backward(B, L, S, H, K, D, causal, seg, dtype):
    """One backward kernel (dq by atomic adds from every kv block) matches the reference's gradients."""
    _check(B, L, S, H, K, D, causal, seg, dtype, F32 if dtype == jnp.float32 else BF16, block_sizes=FUSED)


def test_flash_bf16_packed_hd128():
    _check(2, 64, 64, 4, 2, 128, True, True, jnp.bfloat16, BF16)


def test_flash_default_blocks_and_cross_segments():
    # Default (interpreter) tiles; q and kv lengths differ with their own segment ids, non-causal.
    _check(1, 40, 130, 4, 2, 32, False, True, jnp.float32, F32, block_sizes=None)


def test_flash_fully_masked_rows_are_zero():
    # q longer than kv with causal: rows i < L - S see no key; padding (segment 0) rows see no key either.
    B, L, S, H, K, D = 2, 45, 20, 4, 2, 16
    out, (dq, _, _), _ = _check(B, L, S, H, K, D, True, False, jnp.float32, F32)
    np.testing.assert_array_equal(np.asarray(out[:, : L - S]), 0.0)
    np.testing.assert_array_equal(np.asarray(dq[:, : L - S]), 0.0)
    seg = jnp.array([[1] * 10 + [2] * 14 + [0] * 8, [0] * 32]).astype(jnp.int32)
    q = _rand(jax.random.PRNGKey(3), (2, 32, H, D), jnp.float32)
    k = _rand(jax.random.PRNGKey(4), (2, 32, K, D), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(fa.flash_attention(q, k, v, True, seg, block_sizes=SMALL) ** 2)

    out = jax.jit(lambda q, k: fa.flash_attention(q, k, k, True, seg, block_sizes=SMALL))(q, k)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, k)
    np.testing.assert_array_equal(np.asarray(out[0, 24:]), 0.0)
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_array_equal(np.asarray(g[0, 24:]), 0.0)
        np.testing.assert_array_equal(np.asarray(g[1]), 0.0)
    assert np.all(np.asarray(jnp.abs(out[0, :24]).sum(-1)) > 0)


def test_block_ranges_skip_masked_blocks():
    # Causal 64 x 64 with 16-wide tiles: row block i visits kv blocks [0, i], the diagonal one masked.
    r = np.asarray(
        fa.block_ranges(
            n_rows=64, n_cols=64, br=16, bc=16, nr=4, nc=4, rows_are_q=True, causal=True, offset=0
        )
    ).reshape(4, 4)
    np.testing.assert_array_equal(r, [[0, 0, 0, 1], [0, 0, 1, 2], [0, 0, 2, 3], [0, 0, 3, 4]])
    # Two documents of 32 tokens: the second document's rows never visit the first document's blocks.
    seg = jnp.array([[1] * 32 + [2] * 32], jnp.int32)
    r = np.asarray(
        fa.block_ranges(
            n_rows=64,
            n_cols=64,
            br=16,
            bc=16,
            nr=4,
            nc=4,
            rows_are_q=True,
            causal=True,
            offset=0,
            row_seg=seg,
            col_seg=seg,
        )
    ).reshape(4, 4)
    np.testing.assert_array_equal(r[2:], [[2, 2, 2, 3], [2, 2, 3, 4]])
    # dk/dv view (rows = kv blocks): kv block 0 is seen by q blocks [0, 2), q block 1 needs no mask.
    r = np.asarray(
        fa.block_ranges(
            n_rows=64,
            n_cols=64,
            br=16,
            bc=16,
            nr=4,
            nc=4,
            rows_are_q=False,
            causal=True,
            offset=0,
            row_seg=seg,
            col_seg=seg,
        )
    ).reshape(4, 4)
    np.testing.assert_array_equal(r[0], [0, 1, 2, 2])


def test_flash_rejects_bad_input():
    q = jnp.ones((1, 8, 3, 16))
    with pytest.raises(ValueError, match="multiple of"):
        fa.flash_attention(q, jnp.ones((1, 8, 2, 16)), jnp.ones((1, 8, 2, 16)))
    with pytest.raises(ValueError, match="power of two"):
        fa.flash_attention(q, q, q, block_sizes=fa.BlockSizes(block_q=24))


# ------------------------------------------------------------------------------------------------------
# Decode attention


@pytest.mark.parametrize(
    "B,S,H,K,D,dtype,block_k,splits",
    [
        (4, 64, 8, 2, 32, jnp.float32, 16, 3),  # GQA 4, several splits
        (3, 50, 4, 4, 16, jnp.float32, None, None),  # MHA, cache length not a multiple of 16 (padded)
        (2, 96, 8, 1, 64, jnp.bfloat16, 32, 2),  # MQA, bf16
    ],
)
def test_decode_attention(B, S, H, K, D, dtype, block_k, splits):
    ks = jax.random.split(jax.random.PRNGKey(7), 4)
    q, kc, vc = (
        _rand(ks[0], (B, H, D), dtype),
        _rand(ks[1], (B, K, D, S), dtype),  # keys transposed, as gptjax.model.init_cache keeps them
        _rand(ks[2], (B, K, S, D), dtype),
    )
    lengths = jax.random.randint(ks[3], (B,), 1, S + 1).at[0].set(S).at[1].set(0)
    out = jax.jit(functools.partial(da.decode_attention, block_k=block_k, num_splits=splits))(
        q, kc, vc, lengths
    )
    ref = jax.jit(da.decode_attention_reference)(q, kc, vc, lengths)
    assert out.shape == (B, H, D) and out.dtype == dtype
    assert _err(out, ref) <= (F32 if dtype == jnp.float32 else BF16)
    np.testing.assert_array_equal(np.asarray(out[1]), 0.0)  # length 0: zeros, not NaN


# ------------------------------------------------------------------------------------------------------
# Dispatch and model


def test_cudnn_impl_with_segments():
    ks = jax.random.split(jax.random.PRNGKey(11), 4)
    q, k, v = (
        _rand(ks[0], (2, 24, 4, 16), jnp.float32),
        _rand(ks[1], (2, 24, 2, 16), jnp.float32),
        _rand(ks[2], (2, 24, 2, 16), jnp.float32),
    )
    seg = _segments(ks[3], 2, 24)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            attn_lib.attention(q, k, v, impl="cudnn", segment_ids_BL=seg)
    # The dense-mask path itself (same code, XLA implementation) respects documents and padding.
    dense = functools.partial(attn_lib.cudnn_attention, causal=True, implementation="xla")
    out = jax.jit(dense)(q, k, v, segment_ids_BL=seg)
    ref = jax.jit(fa.flash_attention_reference, static_argnums=3)(q, k, v, True, seg)
    assert _err(out, ref) <= F32


def _tiny_cfg(impl):
    return model_lib.ModelConfig.llama(
        vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_len=64, attention_impl=impl
    )


def test_model_apply_pallas_matches_xla():
    cfg_x, cfg_p = _tiny_cfg("xla"), _tiny_cfg("pallas")
    params = model_lib.init(cfg_x, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 40), 0, 97)
    seg = _segments(jax.random.PRNGKey(2), 2, 40)
    w = jax.random.normal(jax.random.PRNGKey(3), (2, 40, 97))

    def loss(cfg, params):
        logits = model_lib.apply(cfg, params, tokens, segment_ids_BL=seg)
        return jnp.sum(logits * w), logits

    (_, logits_x), gx = jax.jit(jax.value_and_grad(functools.partial(loss, cfg_x), has_aux=True))(params)
    (_, logits_p), gp = jax.jit(jax.value_and_grad(functools.partial(loss, cfg_p), has_aux=True))(params)
    assert _err(logits_p, logits_x) <= 1e-4
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gx), strict=True):
        assert _err(a, b) <= 1e-4


def test_model_decode_pallas_matches_xla():
    cfg_x, cfg_p = _tiny_cfg("xla"), _tiny_cfg("pallas")
    params = model_lib.init(cfg_x, jax.random.PRNGKey(0))
    B, P, S = 3, 6, 32
    prompts = jax.random.randint(jax.random.PRNGKey(5), (B, P), 0, 97)
    prompt_len = jnp.array([6, 3, 4])  # right-padded prompts: rows decode from different slots

    def run(cfg):
        step = jax.jit(functools.partial(model_lib.decode, cfg))
        cache = model_lib.init_cache(cfg, B, S)
        logits, cache = step(params, prompts, jnp.broadcast_to(jnp.arange(P), (B, P)), cache)
        pos = prompt_len - 1
        tok = prompts[jnp.arange(B), pos]
        outs = []
        for _ in range(4):
            logits, cache = step(params, tok[:, None], pos[:, None], cache)
            outs.append(logits[:, 0])
            tok, pos = jnp.argmax(logits[:, 0], -1), pos + 1
        return jnp.stack(outs)

    assert _err(run(cfg_p), run(cfg_x)) <= 1e-4


def test_kernels_lower_to_triton_for_cuda(monkeypatch):
    """The GPU path (not the interpreter) lowers to Triton IR for CUDA, checked here without a GPU."""
    from jax import export

    from gptjax.kernels import _compat

    monkeypatch.setattr(_compat, "backend", lambda: "gpu")
    monkeypatch.setattr(_compat, "use_interpret", lambda interpret: bool(interpret))
    bf = jnp.bfloat16
    q, k = jax.ShapeDtypeStruct((2, 300, 8, 128), bf), jax.ShapeDtypeStruct((2, 300, 2, 128), bf)
    seg = jax.ShapeDtypeStruct((2, 300), jnp.int32)

    def train(q, k, v, do, s):
        return jax.vjp(lambda q, k, v: fa.flash_attention(q, k, v, True, s), q, k, v)[1](do)

    k_cache, v_cache = jax.ShapeDtypeStruct((2, 2, 64, 1024), bf), jax.ShapeDtypeStruct((2, 2, 1024, 64), bf)
    qd, lengths = jax.ShapeDtypeStruct((2, 8, 64), bf), jax.ShapeDtypeStruct((2,), jnp.int32)
    allow = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]

    def train_fused(q, k, v, do, s):
        bs = dataclasses.replace(fa.BlockSizes.default("gpu", 128), fused_dq=True)
        return jax.vjp(lambda q, k, v: fa.flash_attention(q, k, v, True, s, block_sizes=bs), q, k, v)[1](do)

    for fn, args, n_kernels in [
        (train, (q, k, k, q, seg), 3),
        (train_fused, (q, k, k, q, seg), 2),
        (da.decode_attention, (qd, k_cache, v_cache, lengths), 1),
    ]:
        exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=allow)(*args)
        assert exp.mlir_module().count("@__gpu$xla.gpu.triton") == n_kernels


def test_tpu_splash_path_matches_reference():
    """The TPU lowering (jax's splash attention behind our conventions), run in its interpreter on CPU."""
    from gptjax.kernels import flash_tpu

    B, L, H, K, D = 1, 200, 4, 2, 64
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v = (
        _rand(ks[0], (B, L, H, D), jnp.float32),
        _rand(ks[1], (B, L, K, D), jnp.float32),
        _rand(ks[2], (B, L, K, D), jnp.float32),
    )
    do = _rand(ks[3], (B, L, H, D), jnp.float32)
    seg = _segments(ks[4], B, L)
    fn = lambda q, k, v: flash_tpu.splash_attention(q, k, v, True, seg, seg, D**-0.5, interpret=True)
    ref = lambda q, k, v: fa.flash_attention_reference(q, k, v, True, seg)

    @functools.partial(jax.jit, static_argnums=0)
    def values_and_grads(f, q, k, v, do):
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(do))

    for a, b in zip(values_and_grads(fn, q, k, v, do), values_and_grads(ref, q, k, v, do), strict=True):
        assert _err(a, b) <= F32


def test_pallas_dispatch_under_mesh():
    """Under a context mesh the kernels run per device (shard_map over batch and heads) and still match."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    # 8 simulated CPU devices give a (2, 2, 2) mesh; a single accelerator still runs the shard_map path.
    shape = (2, 2, 2) if jax.device_count() >= 8 else (1, 1, 1)
    mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    ks = jax.random.split(jax.random.PRNGKey(2), 6)
    q, k, v = (
        _rand(ks[0], (4, 40, 4, 16), jnp.float32),
        _rand(ks[1], (4, 40, 2, 16), jnp.float32),
        _rand(ks[2], (4, 40, 2, 16), jnp.float32),
    )
    seg = _segments(ks[3], 4, 40)

    def loss(impl, q, k, v):
        return jnp.sum(attn_lib.attention(q, k, v, impl=impl, segment_ids_BL=seg) ** 2)

    with jax.set_mesh(mesh):
        q_sharded = jax.device_put(q, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")))
        got = jax.jit(jax.value_and_grad(functools.partial(loss, "pallas"), argnums=(0, 1, 2)))(
            q_sharded, k, v
        )
        pos = jnp.array([[39], [0], [17], [25]])
        kc, vc = jnp.transpose(k, (0, 2, 3, 1)), jnp.swapaxes(v, 1, 2)  # caches: [B, K, D, S], [B, K, S, D]
        dec = jax.jit(functools.partial(attn_lib.cached_attention, impl="pallas"))(q[:, :1], kc, vc, pos)
    want = jax.jit(jax.value_and_grad(functools.partial(loss, "xla"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert _err(a, b) <= F32
    assert _err(dec, jax.jit(attn_lib.cached_attention)(q[:, :1], kc, vc, pos)) <= F32


def test_remat_keeps_the_forward_kernel_outputs():
    """Under remat 'dots_no_batch' the backward pass reuses the forward kernel's out and lse: one forward
    kernel per layer in the whole gradient computation (it ran twice, a second time in the backward pass)."""

    def kernels(jaxpr, found):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                info = eqn.params.get("name", eqn.params.get("name_and_src_info"))
                found.append(str(getattr(info, "name", info)).split(" ")[0])
                continue
            for p in eqn.params.values():
                for j in p if isinstance(p, (tuple, list)) else (p,):
                    j = getattr(j, "jaxpr", j)
                    if hasattr(j, "eqns"):
                        kernels(j, found)
        return found

    from gptjax.losses import lm

    for remat, fwd_per_layer in (("dots_no_batch", 1), ("full", 2)):
        cfg = model_lib.ModelConfig.llama(
            vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=16,
            attention_impl="pallas", remat=remat, scan_layers=False,
        )  # fmt: skip
        params = model_lib.init(cfg, jax.random.key(1))
        tokens = jax.random.randint(jax.random.key(2), (2, 17), 0, 97)
        batch = {"inputs_BL": tokens[:, :-1], "targets_BL": tokens[:, 1:], "weights_BL": jnp.ones((2, 16))}

        class Ctx:
            model_cfg = cfg

        loss = lambda p: lm.loss_fn(p, batch, jax.random.key(0), Ctx())[0]  # noqa: E731, B023
        found = kernels(jax.make_jaxpr(jax.grad(loss))(params).jaxpr, [])
        assert found.count("flash_attention_fwd") == fwd_per_layer * 2, (remat, found)
        assert found.count("flash_attention_dq") == 2 and found.count("flash_attention_dkdv") == 2
