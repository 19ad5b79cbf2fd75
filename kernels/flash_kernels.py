"""Pallas kernel bodies and calls of flash attention: forward, dq and dk/dv (FlashAttention-2 style).

Inputs arrive padded by ``flash_attention``: q/do [B, Lp, H, Dp], k/v [B, Sp, K, Dp] with Lp, Sp multiples of
every block size and Dp a power of two. Softmax runs in base 2 (log2(e) is folded into the scale), the
log-sum-exp ``lse`` is saved per query row in base 2. Each program walks its kv (or q) blocks in three
loops, [lo, a) masked, [a, b) unmasked, [b, hi) masked, with (lo, a, b, hi) computed per row block by
``flash_attention.block_ranges``: blocks outside [lo, hi) are never touched (causal, sliding-window and
segment skipping), blocks in [a, b) need no mask. A sliding window arrives as a one-element int32 input
(it may be traced: scanned layers that mix local and global attention share one kernel); a soft-cap
(scores c * tanh(s / c), Gemma 2) is static, and the backward kernels apply its derivative 1 - tanh^2.
Masked scores are -inf; a row with no visible key keeps max = -inf, which is read as 0 so nothing becomes
NaN, and its lse is +inf so the backward pass gives it zero weight.

With ``fused_dq`` the backward pass is one kernel: the dk/dv kernel also adds each tile's dS^T K into an
fp32 dq buffer with atomic adds, so P and dP are computed once (five matmuls per tile, not seven), at the
price of atomics on dq; without it a separate dq kernel recomputes them.

Grouped-query attention is native: a query head h reads kv head h // G through the BlockSpec index map in
the forward and dq kernels, and the dk/dv kernel of kv head k loops over its G query heads, so repeated
K/V or per-query-head dk/dv are never materialised.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from gptjax.kernels import _compat


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything the kernels need to know at trace time (hashable: part of the custom_vjp's static args)."""

    B: int
    L: int  # actual query length
    S: int  # actual kv length
    H: int
    K: int
    D: int  # actual head dim
    Lp: int
    Sp: int
    Dp: int
    causal: bool
    has_seg: bool
    scale: float  # softmax scale (natural log domain)
    block_q: int
    block_k: int
    block_q_dkv: int
    block_k_dkv: int
    block_q_dq: int
    block_k_dq: int
    num_warps: int
    num_stages: int
    interpret: bool
    fused_dq: bool = False
    has_window: bool = False  # a sliding window (its size is the kernels' last input before dq's buffer)
    softcap: float = 0.0  # > 0: scaled scores capped at softcap * tanh(s / softcap)

    @property
    def G(self) -> int:
        return self.H // self.K

    @property
    def offset(self) -> int:
        """Bottom-right causal alignment: query i sees key j <= i + offset."""
        return self.S - self.L

    @property
    def scale2(self) -> float:
        return self.scale * 1.4426950408889634  # log2(e)


LOG2E = 1.4426950408889634


def _scores(c: Static, qk):
    """(base-2 scores of a q . k tile, tanh of the capped scores or None without a soft-cap)."""
    if not c.softcap:
        return qk * c.scale2, None
    t = jnp.tanh(qk * (c.scale / c.softcap))
    return t * (c.softcap * LOG2E), t


def _uncap(ds, t):
    """The score gradient through the soft-cap (d/ds c * tanh(s / c) = 1 - tanh^2)."""
    return ds if t is None else ds * (1.0 - t * t)


def _mask(c: Static, q_idx, k_idx, q_seg, k_seg, window=None):
    """Boolean mask broadcast from q_idx/k_idx (and segment ids) already shaped for the score tile."""
    mask = None

    def add(m):
        return m if mask is None else mask & m

    if c.causal:
        mask = add(q_idx + c.offset >= k_idx)
    if c.has_window:
        mask = add(q_idx + c.offset - k_idx < window)
    if c.Sp != c.S:
        mask = add(k_idx < c.S)
    if c.Lp != c.L:
        mask = add(q_idx < c.L)
    if c.has_seg:
        mask = add(q_seg == k_seg)
    return mask


def _three_loops(ranges_ref, step, carry):
    lo, a, b, hi = ranges_ref[0], ranges_ref[1], ranges_ref[2], ranges_ref[3]
    carry = lax.fori_loop(lo, a, functools.partial(step, masked=True), carry)
    carry = lax.fori_loop(a, b, functools.partial(step, masked=False), carry)
    return lax.fori_loop(b, hi, functools.partial(step, masked=True), carry)


def _row_block(c: Static, n_blocks: int):
    """Causal rows late in the sequence do the most work: launch them first."""
    i = pl.program_id(0)
    return n_blocks - 1 - i if c.causal else i


def _row_index_map(c: Static, n_blocks: int):
    return (lambda i: n_blocks - 1 - i) if c.causal else (lambda i: i)


# ------------------------------------------------------------------------------------------------------
# Forward


def _inputs(c: Static, refs, n_fixed: int):
    """(the fixed leading refs, q / k segment refs or Nones, the window value or None, the other refs)."""
    fixed, rest = refs[:n_fixed], refs[n_fixed:]
    seg = rest[:2] if c.has_seg else (None, None)
    rest = rest[2:] if c.has_seg else rest
    window = rest[0][0] if c.has_window else None
    return fixed, seg, window, rest[1:] if c.has_window else rest


def _fwd_kernel(*refs, c: Static):
    (ranges_ref, q_ref, k_ref, v_ref), (qseg_ref, kseg_ref), window, (o_ref, lse_ref) = _inputs(c, refs, 4)
    bq, bk = c.block_q, c.block_k
    i = _row_block(c, c.Lp // bq)
    q = q_ref[...]
    q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q_seg = qseg_ref[...][:, None] if c.has_seg else None

    def step(j, carry, masked):
        acc, m, denom = carry
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        s, _ = _scores(c, _compat.dot_nt(q, k))
        if masked:
            k_idx = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            k_seg = kseg_ref[pl.ds(start, bk)][None, :] if c.has_seg else None
            s = jnp.where(_mask(c, q_idx, k_idx, q_seg, k_seg, window), s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        denom = denom * alpha + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(start, bk), :]
        acc = acc * alpha[:, None] + _compat.dot_nn(p.astype(v.dtype), v)
        return acc, m_new, denom

    carry = (
        jnp.zeros((bq, c.Dp), jnp.float32),
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    acc, m, denom = _three_loops(ranges_ref, step, carry)
    empty = denom == 0.0
    l_safe = jnp.where(empty, 1.0, denom)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(l_safe))


def _window_spec():
    """The sliding window's size: one int32 every program reads."""
    return pl.BlockSpec((1,), lambda i, b, h: (0,))


def forward(c: Static, q, k, v, q_seg, k_seg, ranges, window=None):
    """o [B, Lp, H, Dp] (q dtype), lse [B, H, Lp] fp32 (base 2)."""
    bq = c.block_q
    nq = c.Lp // bq
    row = _row_index_map(c, nq)
    G = c.G
    rb = ranges.shape[0] // (nq * 4)  # 1 (shared by the batch) or B
    in_specs = [
        pl.BlockSpec((4,), lambda i, b, h: ((b if rb > 1 else 0) * nq + row(i),)),
        pl.BlockSpec((None, bq, None, c.Dp), lambda i, b, h: (b, row(i), h, 0)),
        pl.BlockSpec((None, c.Sp, None, c.Dp), lambda i, b, h: (b, 0, h // G, 0)),
        pl.BlockSpec((None, c.Sp, None, c.Dp), lambda i, b, h: (b, 0, h // G, 0)),
    ]
    args = [ranges, q, k, v]
    if c.has_seg:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, b, h: (b, row(i))),
            pl.BlockSpec((None, c.Sp), lambda i, b, h: (b, 0)),
        ]
        args += [q_seg, k_seg]
    if c.has_window:
        in_specs.append(_window_spec())
        args.append(window)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, c=c),
        grid=(nq, c.B, c.H),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, c.Dp), lambda i, b, h: (b, row(i), h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, row(i))),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((c.B, c.H, c.Lp), jnp.float32),
        ],
        compiler_params=_compat.compiler_params(c.interpret, c.num_warps, c.num_stages),
        interpret=c.interpret,
        name="flash_attention_fwd",
    )(*args)


# ------------------------------------------------------------------------------------------------------
# Backward: dq


def _dq_kernel(*refs, c: Static):
    fixed, (qseg_ref, kseg_ref), window, (dq_ref,) = _inputs(c, refs, 7)
    ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = fixed
    bq, bk = c.block_q_dq, c.block_k_dq
    i = _row_block(c, c.Lp // bq)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    q_idx = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q_seg = qseg_ref[...][:, None] if c.has_seg else None

    def step(j, dq, masked):
        start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s, t = _scores(c, _compat.dot_nt(q, k))
        if masked:
            k_idx = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            k_seg = kseg_ref[pl.ds(start, bk)][None, :] if c.has_seg else None
            s = jnp.where(_mask(c, q_idx, k_idx, q_seg, k_seg, window), s, -jnp.inf)
        p = jnp.exp2(s - lse)
        dp = _compat.dot_nt(do, v)
        ds = _uncap(p * (dp - delta), t)
        return dq + _compat.dot_nn(ds.astype(k.dtype), k)

    dq = _three_loops(ranges_ref, step, jnp.zeros((bq, c.Dp), jnp.float32))
    dq_ref[...] = (dq * c.scale).astype(dq_ref.dtype)


def backward_dq(c: Static, q, k, v, do, lse, delta, q_seg, k_seg, ranges, window=None):
    bq = c.block_q_dq
    nq = c.Lp // bq
    row = _row_index_map(c, nq)
    G = c.G
    rb = ranges.shape[0] // (nq * 4)
    q_spec = pl.BlockSpec((None, bq, None, c.Dp), lambda i, b, h: (b, row(i), h, 0))
    kv_spec = pl.BlockSpec((None, c.Sp, None, c.Dp), lambda i, b, h: (b, 0, h // G, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, row(i)))
    in_specs = [
        pl.BlockSpec((4,), lambda i, b, h: ((b if rb > 1 else 0) * nq + row(i),)),
        q_spec,
        kv_spec,
        kv_spec,
        q_spec,
        row_spec,
        row_spec,
    ]
    args = [ranges, q, k, v, do, lse, delta]
    if c.has_seg:
        in_specs += [
            pl.BlockSpec((None, bq), lambda i, b, h: (b, row(i))),
            pl.BlockSpec((None, c.Sp), lambda i, b, h: (b, 0)),
        ]
        args += [q_seg, k_seg]
    if c.has_window:
        in_specs.append(_window_spec())
        args.append(window)
    return pl.pallas_call(
        functools.partial(_dq_kernel, c=c),
        grid=(nq, c.B, c.H),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compat.compiler_params(c.interpret, c.num_warps, c.num_stages),
        interpret=c.interpret,
        name="flash_attention_dq",
    )(*args)


# ------------------------------------------------------------------------------------------------------
# Backward: dk, dv (one program per kv block and kv head; loops over the G query heads that share it),
# and with c.fused_dq also dq (atomic adds into an fp32 buffer)


def _dkdv_kernel(*refs, c: Static):
    fixed, (qseg_ref, kseg_ref), window, rest = _inputs(c, refs, 7)
    ranges_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = fixed
    outs = rest[1:] if c.fused_dq else rest  # the fused dq's zeros input is aliased to its output
    dk_ref, dv_ref = outs[:2]
    dq_ref = outs[2] if c.fused_dq else None
    bq, bk = c.block_q_dkv, c.block_k_dkv
    j = pl.program_id(0)
    k = k_ref[...]
    v = v_ref[...]
    k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
    k_seg = kseg_ref[...][:, None] if c.has_seg else None

    def head(g, carry):
        def step(i, carry, masked):
            dk, dv = carry
            start = pl.multiple_of(i * bq, bq)
            q = q_ref[pl.ds(start, bq), g, :]
            do = do_ref[pl.ds(start, bq), g, :]
            lse = lse_ref[g, pl.ds(start, bq)][None, :]
            delta = delta_ref[g, pl.ds(start, bq)][None, :]
            s_t, t_t = _scores(c, _compat.dot_nt(k, q))  # [bk, bq]: scores transposed
            if masked:
                q_idx = start + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
                q_seg = qseg_ref[pl.ds(start, bq)][None, :] if c.has_seg else None
                s_t = jnp.where(_mask(c, q_idx, k_idx, q_seg, k_seg, window), s_t, -jnp.inf)
            p_t = jnp.exp2(s_t - lse)
            dv = dv + _compat.dot_nn(p_t.astype(do.dtype), do)
            dp_t = _compat.dot_nt(v, do)
            ds_t = _uncap(p_t * (dp_t - delta), t_t).astype(q.dtype)
            dk = dk + _compat.dot_nn(ds_t, q)
            if c.fused_dq:  # unscaled; the caller applies the softmax scale once
                _compat.atomic_add(dq_ref, (pl.ds(start, bq), g, slice(None)), _compat.dot_tn(ds_t, k))
            return dk, dv

        return _three_loops(ranges_ref, step, carry)

    zeros = jnp.zeros((bk, c.Dp), jnp.float32)
    dk, dv = lax.fori_loop(0, c.G, head, (zeros, zeros))
    dk_ref[...] = (dk * c.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_dkdv(c: Static, q, k, v, do, lse, delta, q_seg, k_seg, ranges, window=None):
    """dk, dv [B, Sp, K, Dp] (k dtype); with c.fused_dq also dq [B, Lp, H, Dp] in fp32, not yet scaled."""
    bk = c.block_k_dkv
    nk = c.Sp // bk
    G = c.G
    rb = ranges.shape[0] // (nk * 4)
    q_spec = pl.BlockSpec((None, c.Lp, G, c.Dp), lambda j, b, h: (b, 0, h, 0))
    kv_spec = pl.BlockSpec((None, bk, None, c.Dp), lambda j, b, h: (b, j, h, 0))
    row_spec = pl.BlockSpec((None, G, c.Lp), lambda j, b, h: (b, h, 0))
    in_specs = [
        pl.BlockSpec((4,), lambda j, b, h: ((b if rb > 1 else 0) * nk + j,)),
        q_spec,
        kv_spec,
        kv_spec,
        q_spec,
        row_spec,
        row_spec,
    ]
    args = [ranges, q, k, v, do, lse, delta]
    if c.has_seg:
        in_specs += [
            pl.BlockSpec((None, c.Lp), lambda j, b, h: (b, 0)),
            pl.BlockSpec((None, bk), lambda j, b, h: (b, j)),
        ]
        args += [q_seg, k_seg]
    if c.has_window:
        in_specs.append(_window_spec())
        args.append(window)
    out_specs = [kv_spec, kv_spec]
    out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    aliases = {}
    if c.fused_dq:  # every kv block adds into dq: it starts as zeros, aliased to the output
        aliases = {len(args): 2}
        in_specs.append(q_spec)
        args.append(jnp.zeros(q.shape, jnp.float32))
        out_specs.append(q_spec)
        out_shape.append(jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return pl.pallas_call(
        functools.partial(_dkdv_kernel, c=c),
        grid=(nk, c.B, c.K),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_compat.compiler_params(c.interpret, c.num_warps, c.num_stages),
        interpret=c.interpret,
        name="flash_attention_bwd" if c.fused_dq else "flash_attention_dkdv",
    )(*args)
