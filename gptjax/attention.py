"""Attention dispatch on ``ModelConfig.attention_impl``: 'xla' (reference) | 'cudnn' | 'pallas'.

Conventions shared by every implementation (and by ``gptjax.kernels``):
- q is [B, L, H, D], k and v are [B, S, K, D] with H % K == 0 (grouped-query attention: query head h reads
  kv head h // (H // K)).
- causal masking is bottom-right aligned when L != S: query i sees keys j <= i + (S - L).
- segment ids (int, 0 = padding; any id <= 0 is padding) restrict attention to keys of the same segment;
  padding tokens attend to nothing and are attended by nothing; a query row with no visible key outputs
  zeros, never NaN.

Implementations: 'xla' materialises the scores (reference); 'cudnn' is ``jax.nn.dot_product_attention``'s
cuDNN flash attention (GPU, bf16/fp16; segment ids become an equivalent dense [B, 1, L, S] mask, as cuDNN in
JAX has no segment ids); 'pallas' is our fused kernel ``gptjax.kernels.flash_attention`` (any backend; CPU
runs it in the Pallas interpreter). ``cached_attention`` uses ``gptjax.kernels.decode_attention`` for
single-token decoding when impl == 'pallas'.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLS = ("xla", "cudnn", "pallas")


def attention_mask(
    q_len: int,
    kv_len: int,
    causal: bool,
    q_segment_ids_BL: jax.Array | None = None,
    kv_segment_ids_BS: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask [B or 1, L, S]: True where query may attend to key."""
    mask_LS = jnp.ones((q_len, kv_len), dtype=bool)
    if causal:
        q_idx = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        mask_LS = q_idx >= jnp.arange(kv_len)[None, :]
    mask_BLS = mask_LS[None]
    if q_segment_ids_BL is not None:
        if kv_segment_ids_BS is None:
            kv_segment_ids_BS = q_segment_ids_BL
        same_BLS = q_segment_ids_BL[:, :, None] == kv_segment_ids_BS[:, None, :]
        real_BLS = (q_segment_ids_BL[:, :, None] > 0) & (kv_segment_ids_BS[:, None, :] > 0)
        mask_BLS = mask_BLS & same_BLS & real_BLS
    return mask_BLS


def xla_attention(
    q_BLHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    mask_BLS: jax.Array,
    softmax_scale: float | None = None,
) -> jax.Array:
    """Plain-jnp grouped-query attention with an explicit mask; fp32 softmax. Output dtype = q dtype."""
    B, L, H, D = q_BLHD.shape
    K = k_BSKD.shape[2]
    G = H // K
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    q_BLKGD = q_BLHD.reshape(B, L, K, G, D)
    scores_BKGLS = (
        jnp.einsum("blkgd,bskd->bkgls", q_BLKGD, k_BSKD, preferred_element_type=jnp.float32) * scale
    )
    mask_B11LS = mask_BLS[:, None, None, :, :]
    scores_BKGLS = jnp.where(mask_B11LS, scores_BKGLS, -jnp.inf)
    max_BKGL1 = jnp.max(scores_BKGLS, axis=-1, keepdims=True)
    max_BKGL1 = jnp.where(jnp.isfinite(max_BKGL1), max_BKGL1, 0.0)
    p_BKGLS = jnp.exp(scores_BKGLS - max_BKGL1)
    denom_BKGL1 = jnp.sum(p_BKGLS, axis=-1, keepdims=True)
    p_BKGLS = p_BKGLS / jnp.where(denom_BKGL1 == 0.0, 1.0, denom_BKGL1)
    out_BLKGD = jnp.einsum(
        "bkgls,bskd->blkgd", p_BKGLS.astype(v_BSKD.dtype), v_BSKD, preferred_element_type=jnp.float32
    )
    return out_BLKGD.reshape(B, L, H, D).astype(q_BLHD.dtype)


def _mesh_axes(batch: int, heads: tuple[int, ...]):
    """(context mesh, batch mesh axes or None, 'tensor' or None) for splitting a kernel call per device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, None, None
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    batch_axes = tuple(a for a in ("data", "fsdp") if sizes.get(a, 1) > 1)
    if not batch_axes or batch % math.prod(sizes[a] for a in batch_axes):
        batch_axes = None
    t = sizes.get("tensor", 1)
    head_axis = "tensor" if t > 1 and all(h % t == 0 for h in heads) else None
    return mesh, batch_axes, head_axis


def _shard_call(call, mesh, args, specs, out_spec):
    """shard_map ``call`` over the context mesh (resharding first where the mesh's axes are Explicit)."""
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        args = tuple(
            None if a is None else jax.sharding.reshard(a, sp) for a, sp in zip(args, specs, strict=True)
        )
    return jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=False)(*args)


def _per_shard(fn, q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, kv_segment_ids_BS):
    """Run the flash kernel per device under the context mesh (``jax.set_mesh``): batch over the batch axes,
    heads over 'tensor'. A Pallas call has no partitioning rule, so without a context mesh XLA would gather
    its inputs onto every device; with none set (single device, tests) the kernel is called directly.
    """

    def call(q, k, v, seg, kv_seg):
        return fn(q, k, v, segment_ids_BL=seg, kv_segment_ids_BS=kv_seg)

    args = (q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, kv_segment_ids_BS)
    mesh, b, h = _mesh_axes(q_BLHD.shape[0], (q_BLHD.shape[2], k_BSKD.shape[2]))
    if mesh is None:
        return call(*args)
    qkv, seg = P(b, None, h, None), P(b, None)
    return _shard_call(call, mesh, args, (qkv, qkv, qkv, seg, seg), qkv)


def cudnn_attention(
    q_BLHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    causal: bool = True,
    segment_ids_BL: jax.Array | None = None,
    kv_segment_ids_BS: jax.Array | None = None,
    softmax_scale: float | None = None,
    implementation: str = "cudnn",
) -> jax.Array:
    """``jax.nn.dot_product_attention`` with our conventions (GQA native, bottom-right causal, segments).

    cuDNN in JAX has no segment ids, so packed batches get the equivalent dense mask [B, 1, L, S] (correct,
    but it reads an L x S mask and skips no blocks). Rows with no visible key are zeroed afterwards, since
    a dense mask alone would give them a uniform average. ``implementation='xla'`` runs the same masking
    through XLA (how CPU tests check this path).
    """
    if implementation == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(
                f"attention_impl='cudnn' needs a CUDA GPU (backend here: {jax.default_backend()!r}); "
                "use 'xla' or 'pallas'"
            )
        if q_BLHD.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(
                f"attention_impl='cudnn' needs bf16/fp16 q, k, v (got {q_BLHD.dtype}); set the model dtype "
                "to bfloat16 or use 'pallas'"
            )
    L, S = q_BLHD.shape[1], k_BSKD.shape[1]
    if segment_ids_BL is None and kv_segment_ids_BS is None and (not causal or L == S):
        return jax.nn.dot_product_attention(
            q_BLHD, k_BSKD, v_BSKD, scale=softmax_scale, is_causal=causal, implementation=implementation
        )
    mask_BLS = attention_mask(L, S, causal, segment_ids_BL, kv_segment_ids_BS)
    mask_BLS = jnp.broadcast_to(mask_BLS, (q_BLHD.shape[0], L, S))
    out_BLHD = jax.nn.dot_product_attention(
        q_BLHD, k_BSKD, v_BSKD, mask=mask_BLS[:, None], scale=softmax_scale, implementation=implementation
    )
    seen_BL11 = jnp.any(mask_BLS, axis=-1)[:, :, None, None]
    return jnp.where(seen_BL11, out_BLHD, 0).astype(q_BLHD.dtype)


def attention(
    q_BLHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    impl: str = "xla",
    causal: bool = True,
    segment_ids_BL: jax.Array | None = None,
    kv_segment_ids_BS: jax.Array | None = None,
    softmax_scale: float | None = None,
) -> jax.Array:
    """Self/cross attention over full sequences (training and prefill)."""
    if impl == "xla":
        mask_BLS = attention_mask(q_BLHD.shape[1], k_BSKD.shape[1], causal, segment_ids_BL, kv_segment_ids_BS)
        return xla_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS, softmax_scale)
    if impl == "cudnn":
        return cudnn_attention(
            q_BLHD,
            k_BSKD,
            v_BSKD,
            causal=causal,
            segment_ids_BL=segment_ids_BL,
            kv_segment_ids_BS=kv_segment_ids_BS,
            softmax_scale=softmax_scale,
        )
    if impl == "pallas":
        from gptjax.kernels import flash_attention as fa

        if segment_ids_BL is None and kv_segment_ids_BS is not None:
            segment_ids_BL = jnp.ones(q_BLHD.shape[:2], kv_segment_ids_BS.dtype)
        fn = functools.partial(fa.flash_attention, causal=causal, softmax_scale=softmax_scale)
        return _per_shard(fn, q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, kv_segment_ids_BS)
    raise ValueError(f"attention_impl={impl!r} is not available; choose one of {IMPLS} ('xla' always works)")


def cached_attention(
    q_BLHD: jax.Array,
    k_cache_BSKD: jax.Array,
    v_cache_BSKD: jax.Array,
    q_positions_BL: jax.Array,
    *,
    impl: str = "xla",
    softmax_scale: float | None = None,
) -> jax.Array:
    """Queries at absolute cache slots ``q_positions_BL`` attend to cache slots <= their own slot.

    The cache holds keys in slot order, so this is causal attention by slot index; slots past a row's
    current position are never read (they hold stale or zero entries). With impl == 'pallas' a single
    query token per row (decoding) runs the decode kernel over slots [0, position]; longer chunks
    (prefill at arbitrary per-row slots) use the XLA path.
    """
    if impl == "pallas" and q_BLHD.shape[1] == 1:
        from gptjax.kernels import decode_attention as da

        lengths_B = q_positions_BL[:, 0].astype(jnp.int32) + 1
        call = functools.partial(da.decode_attention, softmax_scale=softmax_scale)
        args = (q_BLHD[:, 0], k_cache_BSKD, v_cache_BSKD, lengths_B)
        mesh, b, h = _mesh_axes(q_BLHD.shape[0], (q_BLHD.shape[2], k_cache_BSKD.shape[2]))
        if mesh is None:
            return call(*args)[:, None]
        cache = P(b, None, h, None)
        return _shard_call(call, mesh, args, (P(b, h, None), cache, cache, P(b)), P(b, h, None))[:, None]
    S = k_cache_BSKD.shape[1]
    mask_BLS = q_positions_BL[:, :, None] >= jnp.arange(S)[None, None, :]
    return xla_attention(q_BLHD, k_cache_BSKD, v_cache_BSKD, mask_BLS, softmax_scale)
