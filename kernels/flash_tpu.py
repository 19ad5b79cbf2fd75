"""TPU lowering of ``flash_attention``: jax's splash attention kernel behind our conventions.

Splash attention is a Pallas TPU (Mosaic) flash kernel with its own backward pass and block-sparse mask
skipping. This wrapper maps our layout and conventions onto it: [B, L, H, D] -> per-batch [H, L, D] via
vmap, GQA through its multi-head path (H % K == 0), bottom-right causal alignment through the causal
mask's offset (S - L), our scale folded into q, lengths padded to multiples of 128 and head dims to
multiples of 128 (padding tokens get segment ids that match nothing), and rows with no visible key zeroed
(splash uses a finite mask value, which would otherwise average them). A sliding window becomes splash's
local mask (its blocks outside the window skipped) and a soft-cap its ``attn_logits_soft_cap``; the
window must be a Python int here (the mask is built ahead of time).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.lru_cache(maxsize=32)
def _kernel(
    H: int,
    Lp: int,
    Sp: int,
    causal: bool,
    offset: int,
    interpret: bool,
    window: int | None = None,
    softcap: float = 0.0,
):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is not None:
        mask = sa.LocalMask((Lp, Sp), (window - 1, 0 if causal else None), offset=offset)
    else:
        mask = sa.CausalMask((Lp, Sp), offset=offset) if causal else sa.FullMask((Lp, Sp))
    blocks = sa.BlockSizes(
        block_q=min(512, Lp),
        block_kv=min(512, Sp),
        block_kv_compute=min(512, Sp),
        block_q_dkv=min(512, Lp),
        block_kv_dkv=min(512, Sp),
        block_kv_dkv_compute=min(512, Sp),
        block_q_dq=min(512, Lp),
        block_kv_dq=min(512, Sp),
    )
    return sa.make_splash_mha(
        sa.MultiHeadMask([mask] * H),
        head_shards=1,
        q_seq_shards=1,
        block_sizes=blocks,
        attn_logits_soft_cap=softcap or None,
        interpret=interpret,
    )


def splash_attention(
    q_BLHD: jax.Array,
    k_BSKD: jax.Array,
    v_BSKD: jax.Array,
    causal: bool,
    segment_ids_BL: jax.Array | None,
    kv_segment_ids_BS: jax.Array | None,
    scale: float,
    interpret: bool = False,
    window: int | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """Same contract as ``flash_attention`` (kv segment ids already defaulted by the caller)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is not None and not isinstance(window, int):
        raise ValueError(
            "TPU flash attention needs a static sliding window: set model.scan_layers=False for a model that "
            "mixes local and global layers"
        )
    B, L, H, D = q_BLHD.shape
    S = k_BSKD.shape[1]
    Lp, Sp, Dp = _round_up(L, 128), _round_up(S, 128), _round_up(D, 128)
    pad = lambda x, n, d: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, Dp - d)))
    q = pad((q_BLHD.astype(jnp.float32) * scale).astype(q_BLHD.dtype), Lp, D).transpose(0, 2, 1, 3)
    k = pad(k_BSKD, Sp, D).transpose(0, 2, 1, 3)
    v = pad(v_BSKD, Sp, D).transpose(0, 2, 1, 3)
    q_seg = jnp.ones((B, L), jnp.int32) if segment_ids_BL is None else segment_ids_BL.astype(jnp.int32)
    kv_seg = jnp.ones((B, S), jnp.int32) if kv_segment_ids_BS is None else kv_segment_ids_BS.astype(jnp.int32)
    q_seg = jnp.pad(jnp.where(q_seg > 0, q_seg, -1), ((0, 0), (0, Lp - L)), constant_values=-1)
    kv_seg = jnp.pad(jnp.where(kv_seg > 0, kv_seg, -2), ((0, 0), (0, Sp - S)), constant_values=-2)
    kernel = _kernel(H, Lp, Sp, bool(causal), S - L, bool(interpret), window, float(softcap))
    out = jax.vmap(kernel)(q, k, v, sa.SegmentIds(q=q_seg, kv=kv_seg))
    out = out.transpose(0, 2, 1, 3)[:, :L, :, :D]
    # Rows that see no key: padding queries, and (causal, L > S) queries before the first key. With
    # cross-attention segment ids a row whose document starts later in kv is not caught here.
    seen_BL = q_seg[:, :L] > 0
    if causal:
        seen_BL = seen_BL & (jnp.arange(L)[None, :] + (S - L) >= 0)
    if window is not None:
        seen_BL = seen_BL & (jnp.arange(L)[None, :] + (S - L) - window < S - 1)
    return jnp.where(seen_BL[:, :, None, None], out, 0).astype(q_BLHD.dtype)
