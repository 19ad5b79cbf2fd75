"""Attention dispatch on ``ModelConfig.attention_impl``: 'xla' (reference) | 'cudnn' | 'pallas'.

Conventions shared by every implementation (and by ``gptjax.kernels``):
- q is [B, L, H, D], k and v are [B, S, K, D] with H % K == 0 (grouped-query attention: query head h reads
  kv head h // (H // K)).
- causal masking is bottom-right aligned when L != S: query i sees keys j <= i + (S - L).
- segment ids (int, 0 = padding; any id <= 0 is padding) restrict attention to keys of the same segment;
  padding tokens attend to nothing and are attended by nothing; a query row with no visible key outputs
  zeros, never NaN.
- a sliding ``window`` W (an int, or a traced int32 when scanned layers mix local and global attention;
  None = no window) keeps the keys less than W behind each query's own slot: query i sees keys
  i + (S - L) - W < j <= i + (S - L) (Mistral, Qwen2, Gemma local layers).
- ``softcap`` c > 0 caps the scaled scores at c * tanh(s / c) before the mask (Gemma 2).

Implementations: 'xla' materialises the scores (reference); 'cudnn' is ``jax.nn.dot_product_attention``'s
cuDNN flash attention (GPU, bf16/fp16; segment ids become an equivalent dense [B, 1, L, S] mask, as cuDNN in
JAX has no segment ids); 'pallas' is our fused kernel ``gptjax.kernels.flash_attention`` (any backend; CPU
runs it in the Pallas interpreter). ``cached_attention`` uses ``gptjax.kernels.decode_attention`` for
single-token decoding when impl == 'pallas'.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gptjax.model import sharding

IMPLS = ("xla", "cudnn", "pallas")


def attention_mask(
    q_len: int,
    kv_len: int,
    causal: bool,
    q_segment_ids_BL: jax.Array | None = None,
    kv_segment_ids_BS: jax.Array | None = None,
    window: int | jax.Array | None = None,
) -> jax.Array:
    """Boolean mask [B or 1, L, S]: True where query may attend to key."""
    mask_LS = jnp.ones((q_len, kv_len), dtype=bool)
    q_idx = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    if causal:
        mask_LS = q_idx >= jnp.arange(kv_len)[None, :]
    if window is not None:
        mask_LS = mask_LS & (q_idx - jnp.arange(kv_len)[None, :] < window)
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
    chunks: int = 1,
    softcap: float = 0.0,
) -> jax.Array:
    """Plain-jnp grouped-query attention with an explicit mask; fp32 softmax. Output dtype = q dtype.

    ``chunks`` > 1 (causal masks only) splits the queries into that many equal chunks; chunk c reads keys
    up to its last row only, skipping the masked upper triangle of the scores (``causal_chunks``).

    Layout: q, k, v are transposed once to heads-major [B, K, ..., D] with a kv head's G query heads folded
    into the rows, so every product is one batched matmul in the layout XLA:CPU's dot wants; left to an
    einsum over [B, L, H, D] operands, XLA re-lays out the score-sized operands inside each product. The
    backward pass is written out (``_xla_attention_bwd``) rather than left to autodiff: autodiff of a
    masked softmax adds a gradient through the row max (which cancels), a separate pass for the division
    and one for the mask, each over the [B, H, L, S] scores; the written-out one is one elementwise pass.
    """
    D = q_BLHD.shape[-1]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    return _xla_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS, scale, chunks, float(softcap))


def _bmm(x, y, contract_x: int, contract_y: int):
    """Batched matmul over the leading (B, K) axes of two rank-4 operands, fp32 accumulation."""
    B, K = x.shape[:2]
    x3, y3 = x.reshape(B * K, *x.shape[2:]), y.reshape(B * K, *y.shape[2:])
    dims = (((contract_x - 1,), (contract_y - 1,)), ((0,), (0,)))
    out = jax.lax.dot_general(x3, y3, dims, preferred_element_type=jnp.float32)
    return out.reshape(B, K, *out.shape[1:])


def _to_rows(x_BLHD, K: int, chunks: int):
    """[B, L, H, D] -> chunk-major rows [B, K, C, R, D]: query chunk c's rows of a kv head's G query heads
    (R = G * L / C) side by side and contiguous, so a chunk is a plain slice (one transpose for all)."""
    B, L, H, D = x_BLHD.shape
    G, n = H // K, L // chunks
    return x_BLHD.reshape(B, chunks, n, K, G, D).transpose(0, 3, 1, 4, 2, 5).reshape(B, K, chunks, G * n, D)


def _from_rows(x_BKCRD, G: int):
    """Inverse of ``_to_rows``."""
    B, K, C, R, D = x_BKCRD.shape
    n = R // G
    return x_BKCRD.reshape(B, K, C, G, n, D).transpose(0, 2, 4, 1, 3, 5).reshape(B, C * n, K * G, D)


def _chunk_keys(L: int, S: int, chunks: int, c: int) -> int:
    """How many keys query chunk c reads: up to its last row, bottom-right aligned (all when one chunk)."""
    return S if chunks == 1 else (c + 1) * (L // chunks) + S - L


def _capped(s, softcap: float):
    """Soft-capped scores c * tanh(s / c) (Gemma 2); the scores themselves when c = 0."""
    return softcap * jnp.tanh(s / softcap) if softcap else s


def _chunk_probs(q_BKRD, k_BKSD, mask_BnS, G: int, softcap: float = 0.0):
    """Softmax probabilities p_BKRS (fp32) of one query chunk; rows with no visible key are all zero.

    Masked scores get a finite -1e30 bias (cheaper than a select over the scores, and a fully masked row
    keeps a finite max); such a row's uniform probabilities are zeroed by the [B, n] visibility factor
    folded into the normalisation, so no score-sized pass is spent on guards.
    """
    B, K, R, _ = q_BKRD.shape
    s_BKGnS = _capped(_bmm(q_BKRD, k_BKSD, 3, 3), softcap).reshape(B, K, G, R // G, -1)
    s_BKGnS = s_BKGnS + jnp.where(mask_BnS, 0.0, -1e30)[:, None, None]
    p_BKGnS = jnp.exp(s_BKGnS - jnp.max(s_BKGnS, axis=-1, keepdims=True))
    visible_B11n1 = jnp.any(mask_BnS, axis=-1, keepdims=True)[:, None, None].astype(jnp.float32)
    p_BKGnS = p_BKGnS * (visible_B11n1 / jnp.sum(p_BKGnS, axis=-1, keepdims=True))
    return p_BKGnS.reshape(B, K, R, -1)


def _sum_key_chunks(chunks_BKSD, S: int):
    """Sum per-chunk key gradients (chunk c covers the first keys only), zero-padded to all S keys."""
    return sum(jnp.pad(x, ((0, 0), (0, 0), (0, S - x.shape[2]), (0, 0))) for x in chunks_BKSD)


def _xla_attention_fwd(q_BLHD, k_BSKD, v_BSKD, mask_BLS, scale, chunks, softcap):
    L, H = q_BLHD.shape[1:3]
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G, n = H // K, L // chunks
    # Scaling q (B*L*H*D values) is cheaper than scaling the scores (B*H*L*S).
    q_BKCRD = _to_rows(q_BLHD * jnp.asarray(scale, q_BLHD.dtype), K, chunks)
    k_BKSD, v_BKSD = k_BSKD.transpose(0, 2, 1, 3), v_BSKD.transpose(0, 2, 1, 3)
    p_chunks, o_chunks = [], []
    for c in range(chunks):
        Sc = _chunk_keys(L, S, chunks, c)
        mask_BnS = mask_BLS[:, c * n : (c + 1) * n, :Sc]
        p_BKRS = _chunk_probs(q_BKCRD[:, :, c], k_BKSD[:, :, :Sc], mask_BnS, G, softcap)
        p_chunks.append(p_BKRS)
        o_chunks.append(_bmm(p_BKRS.astype(v_BSKD.dtype), v_BKSD[:, :, :Sc], 3, 2))
    o_BKCRD = jnp.stack(o_chunks, axis=2).astype(q_BLHD.dtype)
    return _from_rows(o_BKCRD, G), (q_BKCRD, k_BKSD, v_BKSD, mask_BLS, tuple(p_chunks), o_BKCRD)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _xla_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS, scale, chunks, softcap):
    return _xla_attention_fwd(q_BLHD, k_BSKD, v_BSKD, mask_BLS, scale, chunks, softcap)[0]


def _xla_attention_bwd(scale, chunks, softcap, res, dout_BLHD):
    """dS = P * (dP - rowsum(dO * O)): the softmax Jacobian applied in one pass (FlashAttention's form).
    Soft-capped scores also take the cap's derivative 1 - tanh^2, from the scores recomputed (one product
    more, where keeping them would hold a second score-sized array per chunk)."""
    q_BKCRD, k_BKSD, v_BKSD, mask_BLS, p_chunks, o_BKCRD = res
    H = dout_BLHD.shape[2]
    L, S, K = dout_BLHD.shape[1], k_BKSD.shape[2], k_BKSD.shape[1]
    dt, kv_dt = q_BKCRD.dtype, v_BKSD.dtype
    dout_BKCRD = _to_rows(dout_BLHD, K, chunks)
    delta_BKCR1 = jnp.sum(
        dout_BKCRD.astype(jnp.float32) * o_BKCRD.astype(jnp.float32), axis=-1, keepdims=True
    )
    dq_chunks, dk_chunks, dv_chunks = [], [], []
    for c, p_BKRS in enumerate(p_chunks):
        Sc = _chunk_keys(L, S, chunks, c)
        dout_BKRD = dout_BKCRD[:, :, c].astype(kv_dt)
        dv_chunks.append(_bmm(p_BKRS.astype(kv_dt), dout_BKRD, 2, 2))
        dp_BKRS = _bmm(dout_BKRD, v_BKSD[:, :, :Sc], 3, 3)
        ds_BKRS = p_BKRS * (dp_BKRS - delta_BKCR1[:, :, c])
        if softcap:
            t_BKRS = jnp.tanh(_bmm(q_BKCRD[:, :, c], k_BKSD[:, :, :Sc], 3, 3) / softcap)
            ds_BKRS = ds_BKRS * (1.0 - t_BKRS * t_BKRS)
        ds_BKRS = ds_BKRS.astype(dt)
        dq_chunks.append(_bmm(ds_BKRS, k_BKSD[:, :, :Sc].astype(dt), 3, 2))
        dk_chunks.append(_bmm(ds_BKRS, q_BKCRD[:, :, c], 2, 2))
    dq_BLHD = _from_rows(jnp.stack(dq_chunks, axis=2) * scale, H // K)
    dk_BKSD, dv_BKSD = _sum_key_chunks(dk_chunks, S), _sum_key_chunks(dv_chunks, S)
    return (
        dq_BLHD.astype(dt),
        dk_BKSD.transpose(0, 2, 1, 3).astype(k_BKSD.dtype),
        dv_BKSD.transpose(0, 2, 1, 3).astype(kv_dt),
        None,
    )


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)


def causal_chunks(L: int, S: int) -> int:
    """Query chunks for causal 'xla' attention (1 = one block): the masked upper triangle of the scores is
    skipped chunk by chunk. Only self-attention (L == S) of at least 256 tokens is split, into at most 4
    chunks of at least 64 rows (more, smaller chunks cost more in per-op overhead than they skip).
    """
    if L != S or L < 256:
        return 1
    for chunks in range(4, 1, -1):
        if L % chunks == 0 and L // chunks >= 64:
            return chunks
    return 1


def _mesh_axes(batch: int, heads: tuple[int, ...]):
    """(context mesh, batch mesh axes or None, 'tensor' or None) for splitting a kernel call per device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, None, None
    batch_axes = sharding.context_batch_axes(mesh, batch)
    t = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True)).get("tensor", 1)
    head_axis = "tensor" if t > 1 and all(h % t == 0 for h in heads) else None
    return mesh, batch_axes, head_axis


def _shard_call(call, mesh, args, specs, out_spec):
    """shard_map ``call`` over the context mesh (resharding first where the mesh's axes are Explicit)."""
    if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        args = tuple(
            None if a is None else jax.sharding.reshard(a, sp) for a, sp in zip(args, specs, strict=True)
        )
    return jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=out_spec, check_vma=False)(*args)


def _per_shard(fn, q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, kv_segment_ids_BS, window=None):
    """Run the flash kernel per device under the context mesh (``jax.set_mesh``): batch over the batch axes,
    heads over 'tensor'. A Pallas call has no partitioning rule, so without a context mesh XLA would gather
    its inputs onto every device; with none set (single device, tests) the kernel is called directly.
    """

    def call(q, k, v, seg, kv_seg, win):
        return fn(q, k, v, segment_ids_BL=seg, kv_segment_ids_BS=kv_seg, window=win)

    if window is not None and not isinstance(window, int):  # traced: an argument, replicated
        window = jnp.asarray(window, jnp.int32)
    args = (q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, kv_segment_ids_BS)
    mesh, b, h = _mesh_axes(q_BLHD.shape[0], (q_BLHD.shape[2], k_BSKD.shape[2]))
    if mesh is None:
        return call(*args, window)
    qkv, seg = P(b, None, h, None), P(b, None)
    if window is None or isinstance(window, int):
        return _shard_call(lambda *a: call(*a, window), mesh, args, (qkv, qkv, qkv, seg, seg), qkv)
    return _shard_call(call, mesh, (*args, window), (qkv, qkv, qkv, seg, seg, P()), qkv)


def cudnn_attention(
    q_BLHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    *,
    causal: bool = True,
    segment_ids_BL: jax.Array | None = None,
    kv_segment_ids_BS: jax.Array | None = None,
    softmax_scale: float | None = None,
    window: int | jax.Array | None = None,
    softcap: float = 0.0,
    implementation: str = "cudnn",
) -> jax.Array:
    """``jax.nn.dot_product_attention`` with our conventions (GQA native, bottom-right causal, segments,
    sliding windows).

    cuDNN in JAX has no segment ids, so packed batches get the equivalent dense mask [B, 1, L, S] (correct,
    but it reads an L x S mask and skips no blocks); so does a traced window (scanned layers that mix local
    and global attention), where a static one is cuDNN's own local window. Rows with no visible key are
    zeroed afterwards, since a dense mask alone would give them a uniform average.
    ``implementation='xla'`` runs the same masking through XLA (how CPU tests check this path). Soft-capped
    scores (Gemma 2) are refused: jax's cuDNN attention has no soft-cap.
    """
    if softcap:
        raise ValueError(
            "attention_impl='cudnn' has no attention soft-cap (this model's attn_softcap="
            f"{softcap}); use 'pallas' or 'xla'"
        )
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
    static_window = window is None or (isinstance(window, int) and causal)
    if segment_ids_BL is None and kv_segment_ids_BS is None and (not causal or L == S) and static_window:
        return jax.nn.dot_product_attention(
            q_BLHD,
            k_BSKD,
            v_BSKD,
            scale=softmax_scale,
            is_causal=causal,
            local_window_size=None if window is None else (window - 1, 0),
            implementation=implementation,
        )
    mask_BLS = attention_mask(L, S, causal, segment_ids_BL, kv_segment_ids_BS, window)
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
    window: int | jax.Array | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """Self/cross attention over full sequences (training and prefill)."""
    if impl == "xla":
        L, S = q_BLHD.shape[1], k_BSKD.shape[1]
        mask_BLS = attention_mask(L, S, causal, segment_ids_BL, kv_segment_ids_BS, window)
        chunks = causal_chunks(L, S) if causal else 1
        return xla_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS, softmax_scale, chunks, softcap)
    if impl == "cudnn":
        return cudnn_attention(
            q_BLHD,
            k_BSKD,
            v_BSKD,
            causal=causal,
            segment_ids_BL=segment_ids_BL,
            kv_segment_ids_BS=kv_segment_ids_BS,
            softmax_scale=softmax_scale,
            window=window,
            softcap=softcap,
        )
    if impl == "pallas":
        # Pallas: imported only when the kernel is asked for
        from gptjax.kernels import flash_attention as fa

        if segment_ids_BL is None and kv_segment_ids_BS is not None:
            segment_ids_BL = jnp.ones(q_BLHD.shape[:2], kv_segment_ids_BS.dtype)
        fn = functools.partial(
            fa.flash_attention, causal=causal, softmax_scale=softmax_scale, softcap=softcap
        )
        return _per_shard(fn, q_BLHD, k_BSKD, v_BSKD, segment_ids_BL, kv_segment_ids_BS, window)
    raise ValueError(f"attention_impl={impl!r} is not available; choose one of {IMPLS} ('xla' always works)")


def cached_attention(
    q_BLHD: jax.Array,
    k_cache_BKDS: jax.Array,
    v_cache_BKSD: jax.Array,
    q_positions_BL: jax.Array,
    *,
    impl: str = "xla",
    softmax_scale: float | None = None,
    window: int | jax.Array | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """Queries at absolute cache slots ``q_positions_BL`` attend to cache slots <= their own slot (and,
    with a ``window`` W, > their slot - W).

    The caches (``gptjax.model.init_cache``: keys [B, K, D, S], values [B, K, S, D]) hold slots in order, so
    this is causal attention by slot index; slots past a row's current position are never read (they hold
    stale or zero entries). A single query token per row (decoding) runs ``_decode_attention``; longer chunks
    (prefill at arbitrary per-row slots) the XLA attention against all slots, masked by slot.
    """
    if q_BLHD.shape[1] == 1:
        return _decode_attention(
            q_BLHD, k_cache_BKDS, v_cache_BKSD, q_positions_BL, impl, softmax_scale, window, softcap
        )
    S = v_cache_BKSD.shape[2]
    behind_BLS = q_positions_BL[:, :, None] - jnp.arange(S)[None, None, :]
    mask_BLS = behind_BLS >= 0
    if window is not None:
        mask_BLS = mask_BLS & (behind_BLS < window)
    k_BSKD, v_BSKD = jnp.transpose(k_cache_BKDS, (0, 3, 1, 2)), jnp.swapaxes(v_cache_BKSD, 1, 2)
    return xla_attention(q_BLHD, k_BSKD, v_BSKD, mask_BLS, softmax_scale, softcap=softcap)


def _decode_attention(
    q_B1HD, k_cache_BKDS, v_cache_BKSD, q_positions_B1, impl, softmax_scale, window=None, softcap=0.0
):
    """One query token per row over cache slots [0, position]: the Pallas decode kernel (impl 'pallas') or
    its plain-jnp reference at default precision (every other impl).

    The reference's two batched products read the caches in place. On the 2-core development CPU (the tiny
    LLaMA, B16, 4 layers) they take 0.4 ms a token at 160 slots and 1.3-1.6 ms at 544; as broadcast
    multiply-and-reduce (materialising [B, S, K, G, D] products) 3 ms at 160; with [B, S, K, D] caches,
    which XLA copied to head-major order every token, 2.6 ms at 544; with keys [B, K, S, D], which the
    matmul library repacks every token, 4.1 ms at 544.
    """
    # Pallas: imported only when the kernel is asked for
    from gptjax.kernels import decode_attention as da

    lengths_B = q_positions_B1[:, 0].astype(jnp.int32) + 1
    # The window's first visible slot per row: the kernel skips the cache blocks before it.
    starts_B = None if window is None else jnp.maximum(lengths_B - window, 0).astype(jnp.int32)
    if impl != "pallas":
        out_BHD = da.decode_attention_reference(
            q_B1HD[:, 0],
            k_cache_BKDS,
            v_cache_BKSD,
            lengths_B,
            softmax_scale,
            precision=None,
            starts_B=starts_B,
            softcap=softcap,
        )
        return out_BHD[:, None]
    call = functools.partial(da.decode_attention, softmax_scale=softmax_scale, softcap=softcap)
    args = (q_B1HD[:, 0], k_cache_BKDS, v_cache_BKSD, lengths_B, starts_B)
    mesh, b, h = _mesh_axes(q_B1HD.shape[0], (q_B1HD.shape[2], k_cache_BKDS.shape[1]))
    if mesh is None:
        return call(*args[:4], starts_B=starts_B)[:, None]
    cache = P(b, h, None, None)
    specs = (P(b, h, None), cache, cache, P(b), P(b))

    def per_shard(q, k, v, lengths, starts):
        return call(q, k, v, lengths, starts_B=starts)

    return _shard_call(per_shard, mesh, args, specs, P(b, h, None))[:, None]
