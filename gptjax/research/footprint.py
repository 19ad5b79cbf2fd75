"""Stand-ins with the fused attention kernels' memory footprint, for planning on a backend without them.

A CPU compile of the model would plan the 'xla' reference attention, which holds [B, H, L, S] scores; the
fused kernels (Pallas, cuDNN) hold only q, k, v, the output and a [B, H, L] log-sum-exp per layer. The
planner (``gptjax.research.plan``) compiles these stand-ins in their place (``planned_attention``): the same
residuals, no scores; and for decoding a read of the cache in place.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from gptjax.model import attention


@jax.custom_vjp
def _footprint(q_BLHD, k_BSKD, v_BSKD):
    return _footprint_fwd(q_BLHD, k_BSKD, v_BSKD)[0]


def _footprint_fwd(q_BLHD, k_BSKD, v_BSKD):
    # An output of q's shape that reads k and v (so they stay live), and the kernel's [B, L, H] statistics.
    mix_BS1D = jnp.mean(k_BSKD + v_BSKD, axis=2, keepdims=True)
    out_BLHD = q_BLHD + jnp.mean(mix_BS1D, axis=1, keepdims=True).astype(q_BLHD.dtype)
    lse_BLH = jnp.sum(q_BLHD.astype(jnp.float32), axis=-1)
    return out_BLHD, (q_BLHD, k_BSKD, v_BSKD, out_BLHD, lse_BLH)


def _footprint_bwd(res, dout_BLHD):
    q, k, v, out, lse = jax.lax.optimization_barrier(res)  # every residual is kept, as the kernel keeps it
    dq = dout_BLHD + (out - q) + lse[..., None].astype(q.dtype)
    dk = jnp.broadcast_to(jnp.mean(dq, axis=(1, 2), keepdims=True)[:, :, :1], k.shape).astype(k.dtype)
    return dq, dk + 0 * k, (dk + 0 * v).astype(v.dtype)


_footprint.defvjp(_footprint_fwd, _footprint_bwd)


def flash_footprint(q_BLHD, k_BSKD, v_BSKD, **_):
    """Stand-in for fused attention with its memory footprint and no [B, H, L, S] array (see module doc)."""
    return _footprint(q_BLHD, k_BSKD, v_BSKD)


def decode_footprint(q_BLHD, k_cache_BKDS, v_cache_BKSD, q_positions_BL, *, impl="xla", **kw):
    """Stand-in for the decode kernel (one query per row): reads the cache in place and returns q's shape;
    its scratch (per-split partial outputs, [B, H, splits, D]) is negligible. Longer chunks go to the
    config's own cached attention."""
    if q_BLHD.shape[1] != 1:
        return _cached_attention(q_BLHD, k_cache_BKDS, v_cache_BKSD, q_positions_BL, impl="xla", **kw)
    touch = k_cache_BKDS[:, :1, :1, :1].astype(q_BLHD.dtype) + v_cache_BKSD[:, :1, :1, :1].astype(
        q_BLHD.dtype
    )
    return q_BLHD + touch.reshape(-1, 1, 1, 1)


_cached_attention = attention.cached_attention


@contextlib.contextmanager
def planned_attention():
    """The fused kernels' footprints in place of the attention functions the model calls."""
    saved = attention.attention, attention.cached_attention
    attention.attention, attention.cached_attention = flash_footprint, decode_footprint
    try:
        yield
    finally:
        attention.attention, attention.cached_attention = saved
