"""Decode attention: one query token per row against a KV cache with per-row valid lengths (Pallas kernel).

    out_BHD = decode_attention(q_BHD, k_cache_BKDS, v_cache_BKSD, lengths_B)

Keys [0, lengths_B[b]) of row b are valid, or [starts_B[b], lengths_B[b]) with ``starts_B`` (a sliding
window: the blocks before a row's start are never read). ``softcap`` c > 0 caps the scaled scores at
c * tanh(s / c) (Gemma 2). Decoding is bound by reading the cache, so the kernel is built
for bandwidth: one program per (row, kv head, split) reads each cache block once for all G = H // K query
heads of that kv head (grouped-query attention without repeating K/V), and the cache is split along its
length (split-K) so that short batches still fill the GPU; the partial softmax results (unnormalised
output, running max, running sum) are merged in jnp. A row with length 0 outputs zeros. The caches are
``gptjax.model.init_cache``'s, kv-head major: keys [B, K, D, S] (transposed, so q @ k is a plain product)
and values [B, K, S, D]; a program reads one contiguous slab of each.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gptjax.kernels import _compat


def decode_attention_reference(
    q_BHD: jax.Array,
    k_cache_BKDS: jax.Array,
    v_cache_BKSD: jax.Array,
    lengths_B: jax.Array,
    softmax_scale: float | None = None,
    precision: lax.Precision | None = lax.Precision.HIGHEST,
    *,
    starts_B: jax.Array | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """Plain-jnp decode attention in fp32; output in q's dtype. Row b's query heads attend to slots
    [0 or starts_B[b], lengths_B[b]) of their kv head; a row with no slot outputs zeros.

    Two batched products over (row, kv head), q [G, D] @ keys [D, S] and p [G, S] @ values [S, D], reading
    the caches in place. The kernel's oracle (HIGHEST precision) and, with ``precision=None``, the 'xla'
    decode path of ``gptjax.attention.cached_attention``.
    """
    B, H, D = q_BHD.shape
    K, S = k_cache_BKDS.shape[1], k_cache_BKDS.shape[3]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    f32 = jnp.float32
    q_BKGD = (q_BHD.astype(f32) * scale).reshape(B, K, H // K, D)  # scaling q: B*H*D products, not B*H*S
    s_BKGS = jnp.einsum("bkgd,bkds->bkgs", q_BKGD, k_cache_BKDS.astype(f32), precision=precision)
    if softcap:
        s_BKGS = softcap * jnp.tanh(s_BKGS / softcap)
    valid_BS = jnp.arange(S)[None, :] < lengths_B[:, None]
    if starts_B is not None:
        valid_BS = valid_BS & (jnp.arange(S)[None, :] >= starts_B[:, None])
    s_BKGS = jnp.where(valid_BS[:, None, None, :], s_BKGS, -jnp.inf)
    m = jnp.max(s_BKGS, axis=-1, keepdims=True)
    p = jnp.exp(s_BKGS - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    o = jnp.einsum("bkgs,bksd->bkgd", p, v_cache_BKSD.astype(f32), precision=precision)
    return o.reshape(B, H, D).astype(q_BHD.dtype)


@dataclasses.dataclass(frozen=True)
class _Static:
    Sp: int
    Gp: int
    Dp: int
    block_k: int
    blocks_per_split: int
    scale2: float
    softcap: float = 0.0  # > 0: scores capped at c * tanh(s / c) (natural-log units)


def _decode_kernel(len_ref, start_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, c: _Static):
    bk = c.block_k
    split = pl.program_id(2)
    length, begin = len_ref[0], start_ref[0]
    n_blocks = lax.div(length + (bk - 1), bk)
    first = jnp.maximum(split * c.blocks_per_split, lax.div(begin, bk))  # blocks before the window: skipped
    last = jnp.minimum(split * c.blocks_per_split + c.blocks_per_split, n_blocks)
    q = q_ref[...]  # [Gp, Dp]

    def step(j, carry):
        acc, m, denom = carry
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[:, pl.ds(start, bk)]  # [Dp, bk]
        s = _compat.dot_nn(q, k)  # [Gp, bk]
        if c.softcap:
            log2e = 1.4426950408889634
            s = c.softcap * log2e * jnp.tanh(s * (c.scale2 / log2e / c.softcap))
        else:
            s = s * c.scale2
        slot = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        valid = (slot < length) & (slot >= begin)
        s = jnp.where(valid, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        denom = denom * alpha + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(start, bk), :]
        acc = acc * alpha[:, None] + _compat.dot_nn(p.astype(v.dtype), v)
        return acc, m_new, denom

    carry = (
        jnp.zeros((c.Gp, c.Dp), jnp.float32),
        jnp.full((c.Gp,), -jnp.inf, jnp.float32),
        jnp.zeros((c.Gp,), jnp.float32),
    )
    acc, m, denom = lax.fori_loop(first, last, step, carry)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = denom


def _pick_block(S: int, want: int) -> int:
    """Largest power-of-two tile <= want (>= 16) dividing S, so the cache is read in place; 0 if none."""
    b = want
    while b >= 16:
        if S % b == 0:
            return b
        b //= 2
    return 0


def decode_attention(
    q_BHD: jax.Array,
    k_cache_BKDS: jax.Array,
    v_cache_BKSD: jax.Array,
    lengths_B: jax.Array,
    interpret: bool = False,
    *,
    starts_B: jax.Array | None = None,
    softcap: float = 0.0,
    softmax_scale: float | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """Attention of one query per row over cache keys [0 or starts_B[b], lengths_B[b]); returns [B, H, D]
    in q's dtype."""
    k_shape = k_cache_BKDS.shape
    kv_match = len(k_shape) == 4 and v_cache_BKSD.shape == (*k_shape[:2], k_shape[3], k_shape[2])
    if q_BHD.ndim != 3 or not kv_match:
        raise ValueError(
            f"decode_attention: expected q [B, H, D], keys [B, K, D, S] and values [B, K, S, D], got "
            f"q {q_BHD.shape}, k {k_cache_BKDS.shape}, v {v_cache_BKSD.shape}"
        )
    B, H, D = q_BHD.shape
    _, K, S, Dk = v_cache_BKSD.shape
    if k_cache_BKDS.shape[0] != B or Dk != D or H % K or lengths_B.shape != (B,):
        raise ValueError(
            f"decode_attention: q {q_BHD.shape}, values {v_cache_BKSD.shape}, lengths {lengths_B.shape} "
            f"disagree (batch, head dim, lengths [B], or {H} heads not a multiple of {K} kv heads)"
        )
    if S == 0:
        return jnp.zeros_like(q_BHD)
    interp = _compat.use_interpret(interpret)
    G = H // K
    scale = float(D**-0.5 if softmax_scale is None else softmax_scale)
    Gp = max(16, _compat.next_pow2(G))  # tl.dot needs >= 16 rows; padded heads are zero queries
    Dp = max(16, _compat.next_pow2(D))
    # Tiles of <= 32 KB: two k/v buffers per pipeline stage stay well inside shared memory.
    want = block_k or (64 if interp else min(128, 32768 // (Dp * jnp.dtype(k_cache_BKDS.dtype).itemsize)))
    bk = _pick_block(S, want)
    k, v = k_cache_BKDS, v_cache_BKSD
    Sp = S
    if bk == 0 or Dp != D:  # odd cache shapes cost one padded copy; multiples of 16 are read in place
        bk = bk or 16
        Sp = -(-S // bk) * bk
        k = jnp.pad(k, ((0, 0), (0, 0), (0, Dp - D), (0, Sp - S)))
        v = jnp.pad(v, ((0, 0), (0, 0), (0, Sp - S), (0, Dp - D)))
    n_blocks = Sp // bk
    if num_splits is None:
        # Enough programs to cover the GPU's SMs twice over; the interpreter wants few.
        num_splits = 2 if interp else -(-264 // (B * K))
    num_splits = max(1, min(num_splits, n_blocks))
    per_split = -(-n_blocks // num_splits)
    num_splits = -(-n_blocks // per_split)
    q = q_BHD.reshape(B, K, G, D)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, Gp - G), (0, Dp - D)))
    lengths = jnp.clip(lengths_B.astype(jnp.int32), 0, S)
    starts = jnp.zeros_like(lengths) if starts_B is None else jnp.clip(starts_B.astype(jnp.int32), 0, S)
    c = _Static(
        Sp=Sp,
        Gp=Gp,
        Dp=Dp,
        block_k=bk,
        blocks_per_split=per_split,
        scale2=scale * 1.4426950408889634,
        softcap=float(softcap),
    )
    part = jax.ShapeDtypeStruct((B, K, num_splits, Gp), jnp.float32)
    row_spec = pl.BlockSpec((None, None, None, Gp), lambda b, h, s: (b, h, s, 0))
    o_parts, m_parts, l_parts = pl.pallas_call(
        functools.partial(_decode_kernel, c=c),
        grid=(B, K, num_splits),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, s: (b,)),
            pl.BlockSpec((1,), lambda b, h, s: (b,)),
            pl.BlockSpec((None, None, Gp, Dp), lambda b, h, s: (b, h, 0, 0)),
            pl.BlockSpec((None, None, Dp, Sp), lambda b, h, s: (b, h, 0, 0)),
            pl.BlockSpec((None, None, Sp, Dp), lambda b, h, s: (b, h, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, Gp, Dp), lambda b, h, s: (b, h, s, 0, 0)),
            row_spec,
            row_spec,
        ],
        out_shape=[jax.ShapeDtypeStruct((B, K, num_splits, Gp, Dp), jnp.float32), part, part],
        compiler_params=_compat.compiler_params(interp, num_warps, num_stages),
        interpret=interp,
        name="decode_attention",
    )(lengths, starts, q, k, v)
    # Merge the splits (base-2 log-sum-exp); splits past a row's length hold m = -inf, l = 0.
    m_max = jnp.max(m_parts, axis=2, keepdims=True)
    m_max = jnp.where(m_max == -jnp.inf, 0.0, m_max)
    w = jnp.exp2(m_parts - m_max)
    l_tot = jnp.sum(w * l_parts, axis=2)
    o = jnp.sum(w[..., None] * o_parts, axis=2) / jnp.where(l_tot == 0.0, 1.0, l_tot)[..., None]
    return o[:, :, :G, :D].reshape(B, H, D).astype(q_BHD.dtype)
