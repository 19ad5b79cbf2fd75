"""Quantised weights as params-tree leaves: the formats (int8 per output channel, group-wise int4, NF4),
their dequantisation, and the check the model's layer loop makes. The model imports this module alone; the
quantisers and the whole-model functions live in ``gptjax.model.quant`` (which re-exports these names).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]

INT4_SCALE_DTYPE = (
    jnp.float16
)  # half-precision group scales (as GPTQ / QLoRA keep them): 0.5 bit a weight at g=32


class Int8(NamedTuple):
    """Symmetric int8, one scale per output channel: w ~ q * scale."""

    q: jax.Array  # int8 [..., I, O]
    scale: jax.Array  # float32 [..., 1, O]


class Int4(NamedTuple):
    """Group-wise 4-bit codes, two a byte: w ~ (code - zero) * scale, zero = 8 when symmetric."""

    packed: jax.Array  # uint8 [..., I/2, O]
    scale: jax.Array  # float16 [..., I/g, O]
    zero: jax.Array | None  # uint8 [..., I/g, O] (asymmetric), or None (symmetric: codes -8..7 stored + 8)


class NF4(NamedTuple):
    """4-bit NormalFloat (QLoRA), two codes a byte: w ~ NF4_LEVELS[code] * absmax of the code's group."""

    packed: jax.Array  # uint8 [..., I/2, O]
    scale: jax.Array  # float16 [..., I/g, O]: each group's max |w|


Quantized = Int8 | Int4 | NF4

# QLoRA's NF4 levels (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) scaled to [-1, 1], with an
# exact 0. A weight's code is its nearest level after dividing by the group's absmax.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)


@jax.jit
def unpack_nibbles(packed: jax.Array) -> jax.Array:
    """The inverse of ``pack_nibbles``: [..., I/2, O] -> uint8 codes [..., I, O]."""
    lo, hi = packed & 0x0F, packed >> 4
    *lead, half, n_out = packed.shape
    return jnp.stack([lo, hi], axis=-2).reshape(*lead, 2 * half, n_out)


@functools.partial(jax.jit, static_argnames="dtype")
def dequantize(qt: Quantized, dtype: Any = jnp.float32) -> jax.Array:
    """w_IO back from its quantised form, in ``dtype`` (computed in fp32, cast once at the end)."""
    if isinstance(qt, Int8):
        return (qt.q.astype(jnp.float32) * qt.scale).astype(dtype)
    codes = unpack_nibbles(qt.packed)
    *lead, n_in, n_out = codes.shape
    groups = qt.scale.shape[-2]
    if isinstance(qt, NF4):
        levels_G = jnp.asarray(NF4_LEVELS)[codes].reshape(*lead, groups, n_in // groups, n_out)
    else:
        zero = 8.0 if qt.zero is None else qt.zero.astype(jnp.float32)[..., None, :]
        levels_G = codes.astype(jnp.float32).reshape(*lead, groups, n_in // groups, n_out) - zero
    w = levels_G * qt.scale.astype(jnp.float32)[..., None, :]
    return w.reshape(*lead, n_in, n_out).astype(dtype)


def is_quantized(x: Any) -> bool:
    return isinstance(x, (Int8, Int4, NF4))


def has_quantized(tree: Any) -> bool:
    """Whether any leaf of ``tree`` (a params tree, an nnx State, a layer's slice) is a quantised weight."""
    return any(is_quantized(x) for x in jax.tree.leaves(tree, is_leaf=is_quantized))


def dense_layer(layer_params: Params, stacked_shapes: Params, dtype: Any) -> Params:
    """One block's params (a layer's slice, a pure dict) with each quantised weight dequantised in
    ``dtype`` and given its own shape: ``stacked_shapes`` are the blocks' ShapeDtypeStructs with their
    leading layer axis (``param_shapes(cfg)['blocks']``). Other leaves as they are."""
    out = {}
    for k, v in layer_params.items():
        if isinstance(v, dict):
            out[k] = dense_layer(v, stacked_shapes[k], dtype)
        elif is_quantized(v):
            out[k] = dequantize(v, jnp.dtype(dtype)).reshape(stacked_shapes[k].shape[1:])
        else:
            out[k] = v
    return out
