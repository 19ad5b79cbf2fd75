"""Fused flash attention for training: forward and custom-VJP backward Pallas kernels, plain-jnp reference.

    out_BLHD = flash_attention(q_BLHD, k_BSKD, v_BSKD, causal=True, segment_ids_BL=None)

Conventions (shared with ``gptjax.attention``): H % K == 0 and query head h reads kv head h // (H // K);
causal masking is bottom-right aligned (query i sees key j <= i + S - L); segment ids are ints with 0 (or
any id <= 0) meaning padding, which attends to nothing and is never attended to; a query row with no
visible key outputs zeros and gets zero gradients. A sliding ``window`` W (an int, or a traced int32)
keeps only the keys less than W behind each query's slot (query i sees i + S - L - W < j <= i + S - L):
whole blocks outside it are skipped like the causal ones. ``softcap`` c > 0 caps the scaled scores at
c * tanh(s / c) (Gemma 2). Any L, S and head dim (multiple of 16 up to 256 is the
tuned range) work: the wrapper pads to block multiples and a power-of-two head dim itself.

Backends: GPU lowers through Pallas' Triton backend (compiler params passed explicitly); TPU uses jax's
splash attention kernel behind the same function (``flash_tpu.py``); CPU, or ``interpret=True``, runs the
same kernels in the Pallas interpreter.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp

from gptjax.kernels import _compat
from gptjax.kernels import flash_kernels as fk


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the three kernels (powers of two >= 16) and Triton launch parameters."""

    block_q: int = 128
    block_k: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    num_warps: int | None = None  # None: 4 for head dim <= 64, else 8
    num_stages: int = 2
    fused_dq: bool = False  # one backward kernel, dq by atomic adds (see flash_kernels)

    @classmethod
    def default(cls, backend: str, head_dim: int, itemsize: int = 2) -> BlockSizes:
        """Tiles sized so that q plus num_stages buffers of k/v tiles fit the H100's 228 KB shared memory
        and the fp32 accumulators fit the registers (per head dim and input width)."""
        if backend == "gpu":
            if head_dim * itemsize > 256:  # bf16 head dims up to 256, fp32 above 64: small tiles
                return cls(
                    64, 32, 32, 32, 32, 32, num_warps=8, num_stages=2 if head_dim * itemsize <= 512 else 1
                )
            # Measured on an H100 (scripts/bench_attention.py --tune, causal, 4k, GQA 4): wide dk/dv tiles
            # with 4 warps spill and cost ~3x in the backward pass; these were the fastest forward+backward.
            # The one-kernel backward (fused_dq) measured 2.4-5x slower than two kernels (atomics on dq).
            fused = os.environ.get("GPTJAX_FLASH_FUSED_BWD", "0") == "1"  # A/B switch for whole-model runs
            if head_dim * itemsize <= 128:
                return cls(64, 64, 64, 64, 64, 64, num_warps=4, num_stages=3, fused_dq=fused)
            # head dim 128: the forward takes 128-wide kv tiles (11% faster forward, measured twice).
            return cls(128, 128, 64, 128, 128, 64, num_warps=8, num_stages=2, fused_dq=fused)
        # Interpreter: large tiles mean fewer grid steps; they are clamped to the sequence below.
        return cls(128, 128, 128, 128, 128, 128, num_warps=4, num_stages=1)


def flash_attention_reference(
    q_BLHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    causal: bool = True,
    segment_ids_BL: jax.Array | None = None,
    softmax_scale: float | None = None,
    kv_segment_ids_BS: jax.Array | None = None,
    precision=jax.lax.Precision.HIGHEST,
    window: int | jax.Array | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """Plain-jnp attention with the same semantics (materialises the [B, H, L, S] scores)."""
    B, L, H, D = q_BLHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    mask_BLS = jnp.ones((1, L, S), bool)
    behind_LS = jnp.arange(L)[:, None] + (S - L) - jnp.arange(S)[None, :]
    if causal:
        mask_BLS = (behind_LS >= 0)[None]
    if window is not None:
        mask_BLS = mask_BLS & (behind_LS < window)[None]
    if segment_ids_BL is not None:
        kv_seg = segment_ids_BL if kv_segment_ids_BS is None else kv_segment_ids_BS
        same_BLS = segment_ids_BL[:, :, None] == kv_seg[:, None, :]
        mask_BLS = mask_BLS & same_BLS & (segment_ids_BL[:, :, None] > 0) & (kv_seg[:, None, :] > 0)
    q_BLKGD = q_BLHD.reshape(B, L, K, H // K, D)
    s = (
        jnp.einsum(
            "blkgd,bskd->bkgls", q_BLKGD, k_BSKD, precision=precision, preferred_element_type=jnp.float32
        )
        * scale
    )
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(mask_BLS[:, None, None], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    o = jnp.einsum(
        "bkgls,bskd->blkgd",
        p.astype(v_BSKD.dtype),
        v_BSKD,
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    return o.reshape(B, L, H, D).astype(q_BLHD.dtype)


def block_ranges(
    *,
    n_rows: int,
    n_cols: int,
    br: int,
    bc: int,
    nr: int,
    nc: int,
    rows_are_q: bool,
    causal: bool,
    offset: int,
    row_seg=None,
    col_seg=None,
    window=None,
) -> jax.Array:
    """Per row block, the column blocks to visit as int32 (lo, a, b, hi), flattened to [Bs * nr * 4].

    Blocks outside [lo, hi) hold no visible pair (causal, behind the sliding ``window``, or segment ranges
    disjoint); blocks in [a, b) are visible for every pair, so they need no mask. Segment ids here are
    internal (padding < 0).
    """
    i = jnp.arange(nr)[:, None]
    j = jnp.arange(nc)[None, :]
    r0, r1 = i * br, jnp.minimum(i * br + br, n_rows) - 1
    c0, c1 = j * bc, jnp.minimum(j * bc + bc, n_cols) - 1
    vis = (r0 < n_rows) & (c0 < n_cols)
    full = c0 + bc <= n_cols
    if causal:
        if rows_are_q:
            vis = vis & (r1 + offset >= c0)
            full = full & (r0 + offset >= c0 + bc - 1)
        else:
            vis = vis & (c1 + offset >= r0)
            full = full & (c0 + offset >= r0 + br - 1)
    if window is not None:  # query q sees key k when q + offset - k < window
        if rows_are_q:
            vis = vis & (r0 + offset - c1 < window)
            full = full & (r0 + br - 1 + offset - c0 < window)
        else:
            vis = vis & (c0 + offset - r1 < window)
            full = full & (c0 + bc - 1 + offset - r0 < window)
    vis, full = vis[None], (full & vis)[None]
    if row_seg is not None:
        rmin, rmax, runi = _block_minmax(row_seg, nr, br)
        cmin, cmax, cuni = _block_minmax(col_seg, nc, bc)
        vis = vis & (rmin[:, :, None] <= cmax[:, None, :]) & (cmin[:, None, :] <= rmax[:, :, None])
        full = full & runi[:, :, None] & cuni[:, None, :] & (rmin[:, :, None] == cmin[:, None, :])
    idx = jnp.arange(nc)
    has = vis.any(-1)
    lo = jnp.where(has, jnp.argmax(vis, -1), 0)
    hi = jnp.where(has, nc - jnp.argmax(vis[..., ::-1], -1), 0)
    has_full = full.any(-1)
    a = jnp.where(has_full, jnp.argmax(full, -1), lo)
    after = ~full & (idx >= a[..., None])
    b = jnp.where(has_full, jnp.where(after.any(-1), jnp.argmax(after, -1), nc), lo)
    return jnp.stack([lo, a, b, hi], -1).astype(jnp.int32).reshape(-1)


def _block_minmax(seg_BN, n_blocks: int, bs: int):
    s = seg_BN.reshape(seg_BN.shape[0], n_blocks, bs)
    valid = s >= 0
    big = jnp.iinfo(jnp.int32).max
    mn = jnp.where(valid, s, big).min(-1)
    mx = jnp.where(valid, s, -1).max(-1)
    return mn, mx, valid.all(-1) & (mn == mx)


def _pad_axis(x, axis: int, size: int, value=0):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _check_block(name: str, b: int):
    if b < 16 or b & (b - 1):
        raise ValueError(f"flash_attention: {name}={b} must be a power of two >= 16")


def flash_attention(
    q_BLHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    causal: bool = True,
    segment_ids_BL: jax.Array | None = None,
    softmax_scale: float | None = None,
    interpret: bool = False,
    *,
    kv_segment_ids_BS: jax.Array | None = None,
    block_sizes: BlockSizes | None = None,
    window: int | jax.Array | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """Fused attention [B, L, H, D] x [B, S, K, D] -> [B, L, H, D] (q dtype), differentiable in q, k, v."""
    if q_BLHD.ndim != 4 or k_BSKD.ndim != 4 or v_BSKD.shape != k_BSKD.shape:
        raise ValueError(
            f"flash_attention: expected q [B, L, H, D] and k, v [B, S, K, D] of one shape, got "
            f"q {q_BLHD.shape}, k {k_BSKD.shape}, v {v_BSKD.shape}"
        )
    B, L, H, D = q_BLHD.shape
    _, S, K, Dk = k_BSKD.shape
    if k_BSKD.shape[0] != B or Dk != D or H % K:
        raise ValueError(
            f"flash_attention: q {q_BLHD.shape} and k/v {k_BSKD.shape} disagree (batch, head dim, or "
            f"{H} query heads not a multiple of {K} kv heads)"
        )
    if D > 256:
        raise ValueError(f"flash_attention: head dim {D} > 256 is not supported (tiles live in registers)")
    if kv_segment_ids_BS is not None and segment_ids_BL is None:
        raise ValueError("flash_attention: kv_segment_ids_BS needs segment_ids_BL for the queries")
    if segment_ids_BL is not None:
        if kv_segment_ids_BS is None:
            if L != S:
                raise ValueError(
                    f"flash_attention: q length {L} != kv length {S}: pass kv_segment_ids_BS too"
                )
            kv_segment_ids_BS = segment_ids_BL
        if segment_ids_BL.shape != (B, L) or kv_segment_ids_BS.shape != (B, S):
            raise ValueError(
                f"flash_attention: segment ids {segment_ids_BL.shape} / {kv_segment_ids_BS.shape} "
                f"should be [B, L] = {(B, L)} / [B, S] = {(B, S)}"
            )
    if L == 0 or S == 0:  # nothing to attend to (or nobody asking): zeros, like any fully masked row
        return jnp.zeros_like(q_BLHD)
    scale = float(D**-0.5 if softmax_scale is None else softmax_scale)
    backend = _compat.backend()
    if backend == "tpu" and not interpret:
        from gptjax.kernels import flash_tpu

        return flash_tpu.splash_attention(
            q_BLHD,
            k_BSKD,
            v_BSKD,
            causal,
            segment_ids_BL,
            kv_segment_ids_BS,
            scale,
            window=window,
            softcap=softcap,
        )
    interp = _compat.use_interpret(interpret)
    Dp = max(16, _compat.next_pow2(D))
    bs = block_sizes or BlockSizes.default("cpu" if interp else "gpu", Dp, jnp.dtype(q_BLHD.dtype).itemsize)
    for name in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq"):
        _check_block(name, getattr(bs, name))
    # Clamp tiles to the (power-of-two rounded) sequence so tiny inputs do not pad to a full tile.
    lq, lk = max(16, _compat.next_pow2(L)), max(16, _compat.next_pow2(S))
    bq, bq_dkv, bq_dq = min(bs.block_q, lq), min(bs.block_q_dkv, lq), min(bs.block_q_dq, lq)
    bk, bk_dkv, bk_dq = min(bs.block_k, lk), min(bs.block_k_dkv, lk), min(bs.block_k_dq, lk)
    Lp = -(-L // max(bq, bq_dkv, bq_dq)) * max(bq, bq_dkv, bq_dq)
    Sp = -(-S // max(bk, bk_dkv, bk_dq)) * max(bk, bk_dkv, bk_dq)
    c = fk.Static(
        B=B,
        L=L,
        S=S,
        H=H,
        K=K,
        D=D,
        Lp=Lp,
        Sp=Sp,
        Dp=Dp,
        causal=bool(causal),
        has_seg=segment_ids_BL is not None,
        scale=scale,
        block_q=bq,
        block_k=bk,
        block_q_dkv=bq_dkv,
        block_k_dkv=bk_dkv,
        block_q_dq=bq_dq,
        block_k_dq=bk_dq,
        num_warps=bs.num_warps or (4 if Dp <= 64 else 8),
        num_stages=bs.num_stages,
        interpret=interp,
        fused_dq=bool(bs.fused_dq),
        has_window=window is not None,
        softcap=float(softcap),
    )
    q = _pad_axis(_pad_axis(q_BLHD, 3, Dp), 1, Lp)
    k = _pad_axis(_pad_axis(k_BSKD, 3, Dp), 1, Sp)
    v = _pad_axis(_pad_axis(v_BSKD, 3, Dp), 1, Sp)
    q_seg = k_seg = None
    if c.has_seg:
        # Internal ids: padding never matches anything (queries -1, keys -2).
        q_seg = _pad_axis(jnp.where(segment_ids_BL > 0, segment_ids_BL, -1).astype(jnp.int32), 1, Lp, -1)
        k_seg = _pad_axis(
            jnp.where(kv_segment_ids_BS > 0, kv_segment_ids_BS, -2).astype(jnp.int32), 1, Sp, -2
        )
    win = None if window is None else jnp.reshape(jnp.asarray(window, jnp.int32), (1,))
    ranges = _all_ranges(c, q_seg, k_seg, win)
    out = _flash(c, q, k, v, q_seg, k_seg, win, *ranges)
    return out[:, :L, :, :D]


def _all_ranges(c: fk.Static, q_seg, k_seg, window=None):
    """Visible block ranges of the forward and dq grids (rows: q blocks) and the dk/dv grid (rows: kv)."""

    def q_rows(bq: int, bk: int):
        return block_ranges(
            n_rows=c.L,
            n_cols=c.S,
            br=bq,
            bc=bk,
            nr=c.Lp // bq,
            nc=c.Sp // bk,
            rows_are_q=True,
            row_seg=q_seg,
            col_seg=k_seg,
            causal=c.causal,
            offset=c.offset,
            window=None if window is None else window[0],
        )

    dkdv = block_ranges(
        n_rows=c.S,
        n_cols=c.L,
        br=c.block_k_dkv,
        bc=c.block_q_dkv,
        nr=c.Sp // c.block_k_dkv,
        nc=c.Lp // c.block_q_dkv,
        rows_are_q=False,
        row_seg=k_seg,
        col_seg=q_seg,
        causal=c.causal,
        offset=c.offset,
        window=None if window is None else window[0],
    )
    r_dq = jnp.zeros((0,), jnp.int32) if c.fused_dq else q_rows(c.block_q_dq, c.block_k_dq)
    return q_rows(c.block_q, c.block_k), r_dq, dkdv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(c, q, k, v, q_seg, k_seg, window, r_fwd, r_dq, r_dkdv):
    return fk.forward(c, q, k, v, q_seg, k_seg, r_fwd, window)[0]


def save_forward_kernel(prim, *_, **params) -> bool:
    """A ``jax.checkpoint`` policy: keep the forward kernel's outputs (out, lse) for the backward pass, so a
    rematerialised block does not run the kernel again (names inside a custom VJP are invisible to remat
    policies; the kernel call itself is not)."""
    if prim.name != "pallas_call":
        return False
    info = params.get("name", params.get("name_and_src_info"))  # a str or a name-and-source record
    return str(getattr(info, "name", info)).split(" ")[0] == "flash_attention_fwd"


def _flash_fwd(c, q, k, v, q_seg, k_seg, window, r_fwd, r_dq, r_dkdv):
    o, lse = fk.forward(c, q, k, v, q_seg, k_seg, r_fwd, window)
    return o, (q, k, v, q_seg, k_seg, window, r_dq, r_dkdv, o, lse)


def _flash_bwd(c, res, do):
    q, k, v, q_seg, k_seg, window, r_dq, r_dkdv, o, lse = res
    do = do.astype(q.dtype)
    delta = jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
    if c.fused_dq:
        dk, dv, dq = fk.backward_dkdv(c, q, k, v, do, lse, delta, q_seg, k_seg, r_dkdv, window)
        dq = (dq * c.scale).astype(q.dtype)
    else:
        dq = fk.backward_dq(c, q, k, v, do, lse, delta, q_seg, k_seg, r_dq, window)
        dk, dv = fk.backward_dkdv(c, q, k, v, do, lse, delta, q_seg, k_seg, r_dkdv, window)
    return dq, dk, dv, None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
