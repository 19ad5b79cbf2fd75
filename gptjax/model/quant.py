"""Weight-only quantisation of a finished model or a frozen base: int8 per output channel, group-wise int4
and NF4, as pure functions over the params pytree.

    q = quantize_int8(w_IO)                    # Int8(q int8 [I, O], scale [1, O])
    q = quantize_int4(w_IO, group_size=64)     # Int4(packed uint8 [I/2, O], scale [I/g, O], zero or None)
    w_IO = dequantize(q, jnp.float32)
    qparams = quantize_params(cfg, params, "int4", group_size=64)   # {name: Int8 | Int4}
    params = dequantize_params(cfg, params, qparams)                # the model's params, dtype kept
    quant_bytes(qparams), quant_bytes(params)                      # memory of each form
    arrays = to_arrays(qparams)                                     # {'wq.q': ...} for np.savez; from_arrays
    qbase = quantize_base(cfg, params, "nf4", group_size=64)        # the params tree, weights quantised
    quantized_base_shapes(cfg, "nf4"), quantized_base_shardings(cfg, mesh, "nf4")   # for a planner
    logits_BLV = model.apply(cfg, lora.combine(adapters, qbase), tokens_BL)   # QLoRA: a frozen 4-bit base

Every function sees a weight as a matrix ``w_IO``: inputs I (the contracted dims, flattened) by outputs O,
with any leading dims (the stacked layers) carried along. "Per output channel" is one scale per column
o; int4 groups are ``group_size`` consecutive inputs of one column, and two 4-bit codes share a byte along
the input dim (code of input 2i in the low nibble, of input 2i+1 in the high one).

Which weights: the matmul weights of every block (attention wq / wk / wv / wo, MLP w_in / w_gate / w_out),
where nearly all of a transformer's parameters sit and where weight-only schemes (LLM.int8, GPTQ, QLoRA)
apply. The token embedding (and an untied LM head) only with ``embeddings=True``: it is both the input
table and, tied, the output projection, so its error reaches every logit directly (on the tiny task it is
the one int4 choice that leans the gold reward down: docs/results.md). Norms, biases, learned positions and a
scalar head always stay in the model's dtype. The embedding's matrix view
is its transpose, [D, V]: inputs are the model dim, one scale per vocabulary row, which is both a
lookup's row and the tied head's output channel.

A quantised base (``quantize_base``) is the params tree itself with each block weight replaced by its Int8 /
Int4 / NF4 leaf: LoRA adapters combine with it as with a dense base, and the model's layer loop dequantises
one layer at a time (``dequantize_layer``, in cfg.dtype), so a scanned model never holds the dequantised
stack; the backward pass dequantises again rather than saving them (``remat='none'`` runs as 'dots'). NF4 is
QLoRA's 4-bit NormalFloat: 16 fixed levels (``NF4_LEVELS``) times each group's absmax, packed like int4.

Libraries (checked against jax 0.10.2 / flax 0.12.8): qwix 0.1.8 installs without upgrades and its
``QArray`` (a pytree; ``qwix.quantize(w, 'nf4' | jnp.int4, tiled_axes=...)``, ``qwix.dequantize``) could hold
these leaves and be dequantised in our scan, but it stores a 4-bit code per jnp.int4 / uint4 element (a byte
each in jax's and numpy's accounting, in np.savez and in ``quant_bytes``), its API is pre-1.0 and built for
module interception (``quantize_model``, providers), and it would be a second format beside the one
``research/compress`` writes. aqtp 0.9.0 is Linen / Pax dot_general injection with no NNX support or
NF4. So the primitives stay here: ~100 lines, packed two codes a byte, no new dependency.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gptjax.model import sharding, transformer
from gptjax.model.config import ModelConfig, head_params
from gptjax.model.qleaf import (  # noqa: F401 (the formats, re-exported: quant.Int8 etc.)
    INT4_SCALE_DTYPE,
    NF4,
    NF4_LEVELS,
    Int4,
    Int8,
    Quantized,
    dense_layer,
    dequantize,
    has_quantized,
    is_quantized,
    unpack_nibbles,
)

Params = dict[str, Any]

MODES = ("int8", "int4", "nf4")
INT8_MAX = 127


class Matrix(NamedTuple):
    """Where a quantisable weight sits and how it reads as [(layers,) I, O]."""

    path: tuple[str, ...]  # its keys in the params tree
    n_in: int  # leading dims (after the layer axis) that are inputs
    transposed: bool  # the embedding: [V, D] is read as [D, V]


# ----------------------------------------------------------------------------------------------------
# One matrix


def _safe(scale: jax.Array) -> jax.Array:
    """An all-zero channel or group gets scale 1 (its codes are 0 either way), never a division by 0."""
    return jnp.where(scale > 0, scale, 1.0)


@jax.jit
def quantize_int8(w_IO: jax.Array) -> Int8:
    """Symmetric per-output-channel int8: scale = max|w| / 127 over each column's inputs."""
    w = jnp.asarray(w_IO, jnp.float32)
    scale = _safe(jnp.max(jnp.abs(w), axis=-2, keepdims=True) / INT8_MAX)
    q = jnp.clip(jnp.round(w / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return Int8(q, scale)


def group_size_for(n_in: int, group_size: int) -> int:
    """The group size used for a matrix of ``n_in`` inputs: ``group_size``, or all inputs when fewer."""
    g = min(group_size, n_in)
    if n_in % g or g % 2:
        raise ValueError(f"int4: {n_in} inputs do not split into groups of {g} (an even divisor is needed)")
    return g


@functools.partial(jax.jit, static_argnames=("group_size", "symmetric"))
def quantize_int4(w_IO: jax.Array, group_size: int = 64, symmetric: bool = True) -> Int4:
    """Group-wise 4-bit: each run of ``group_size`` inputs of a column shares a scale (and, asymmetric, a
    zero point). Symmetric codes are round(w / s) in [-8, 7] with s = max|w| / 7 (so -8 is never used:
    the grid is symmetric about 0); asymmetric ones are round(w / s) + z in [0, 15] with s = (max - min) /
    15, z = round(-min / s): the grid spans each group's own range."""
    w = jnp.asarray(w_IO, jnp.float32)
    *lead, n_in, n_out = w.shape
    g = group_size_for(n_in, group_size)
    w_G = w.reshape(*lead, n_in // g, g, n_out)
    if symmetric:
        scale = _safe(jnp.max(jnp.abs(w_G), axis=-2) / 7).astype(INT4_SCALE_DTYPE)
        s = scale.astype(jnp.float32)[..., None, :]
        codes = jnp.clip(jnp.round(w_G / s), -8, 7) + 8
        zero = None
    else:
        lo, hi = jnp.minimum(jnp.min(w_G, axis=-2), 0.0), jnp.maximum(jnp.max(w_G, axis=-2), 0.0)
        scale = _safe((hi - lo) / 15).astype(INT4_SCALE_DTYPE)
        s = scale.astype(jnp.float32)
        zero = jnp.clip(jnp.round(-lo / s), 0, 15)
        codes = jnp.clip(jnp.round(w_G / s[..., None, :]) + zero[..., None, :], 0, 15)
        zero = zero.astype(jnp.uint8)
    return Int4(pack_nibbles(codes.reshape(*lead, n_in, n_out).astype(jnp.uint8)), scale, zero)


@functools.partial(jax.jit, static_argnames="group_size")
def quantize_nf4(w_IO: jax.Array, group_size: int = 64) -> NF4:
    """Group-wise NF4: each run of ``group_size`` inputs of a column is divided by its absmax and rounded to
    the nearest of the 16 ``NF4_LEVELS`` (a tie to the lower level)."""
    w = jnp.asarray(w_IO, jnp.float32)
    *lead, n_in, n_out = w.shape
    g = group_size_for(n_in, group_size)
    w_G = w.reshape(*lead, n_in // g, g, n_out)
    scale = _safe(jnp.max(jnp.abs(w_G), axis=-2)).astype(INT4_SCALE_DTYPE)
    x_G = w_G / scale.astype(jnp.float32)[..., None, :]
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    codes = jnp.sum(x_G[..., None] > midpoints, axis=-1)  # how many midpoints lie below: the nearest level
    return NF4(pack_nibbles(codes.reshape(*lead, n_in, n_out).astype(jnp.uint8)), scale)


def quantize_matrix(w_IO: jax.Array, mode: str, group_size: int = 64) -> Quantized:
    """One matrix in ``mode``: 'int8' (per output channel), 'int4' (group-wise, symmetric) or 'nf4'."""
    if mode == "int8":
        return quantize_int8(w_IO)
    if mode == "int4":
        return quantize_int4(w_IO, group_size)
    if mode == "nf4":
        return quantize_nf4(w_IO, group_size)
    raise ValueError(f"quantize: mode={mode!r}; use one of {MODES}")


@jax.jit
def pack_nibbles(codes_IO: jax.Array) -> jax.Array:
    """uint8 codes in [0, 16), [..., I, O] -> [..., I/2, O]: input 2i low nibble, 2i+1 high nibble."""
    c = codes_IO.astype(jnp.uint8)
    return c[..., 0::2, :] | (c[..., 1::2, :] << 4)


# ----------------------------------------------------------------------------------------------------
# A model's params


def matrices(cfg: ModelConfig, embeddings: bool = False) -> dict[str, Matrix]:
    """{name: Matrix} of the weights compression touches (module doc): the blocks' matmul weights, and the
    embedding / untied LM head with ``embeddings``."""
    out = {
        name: Matrix(("blocks", "attn", name), 2 if name == "wo" else 1, False)
        for name in ("wq", "wk", "wv", "wo")
    }
    mlp = ("w_in", "w_gate", "w_out") if cfg.gated else ("w_in", "w_out")
    out.update({name: Matrix(("blocks", "mlp", name), 1, False) for name in mlp})
    if embeddings:
        out["embed"] = Matrix(("embed",), 1, True)
        if cfg.head == "lm" and not cfg.tie_embeddings:
            out["lm_head"] = Matrix(("lm_head",), 1, False)
    return out


def get(params: Params, path: tuple[str, ...]) -> jax.Array:
    for k in path:
        params = params[k]
    return params


def replace(params: Params, path: tuple[str, ...], value: Any) -> Params:
    """A copy of the (nested dict) params with ``path`` set to ``value``; the other leaves are shared."""
    if len(path) == 1:
        return {**params, path[0]: value}
    return {**params, path[0]: replace(params[path[0]], path[1:], value)}


def as_matrix(w: jax.Array, m: Matrix) -> jax.Array:
    """A weight as [(layers,) I, O]."""
    if m.transposed:
        return w.T
    lead = 1 if m.path[0] == "blocks" else 0
    n_in = math.prod(w.shape[lead : lead + m.n_in])
    return w.reshape(*w.shape[:lead], n_in, -1)


def from_matrix(w_IO: jax.Array, m: Matrix, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of ``as_matrix``: back to the weight's own ``shape``."""
    return w_IO.T if m.transposed else w_IO.reshape(shape)


@functools.partial(jax.jit, static_argnames=("cfg", "method", "group_size", "symmetric", "embeddings"))
def quantize_params(
    cfg: ModelConfig,
    params: Params,
    method: str,
    *,
    group_size: int = 64,
    symmetric: bool = True,
    embeddings: bool = False,
) -> dict[str, Int8 | Int4]:
    """{name: quantised matrix} for ``matrices(cfg, embeddings)``; ``method`` 'int8' or 'int4'."""
    if method not in ("int8", "int4"):
        raise ValueError(f"quantize_params: method={method!r}; use 'int8' or 'int4'")
    out = {}
    for name, m in matrices(cfg, embeddings).items():
        w_IO = as_matrix(get(params, m.path), m)
        out[name] = quantize_int8(w_IO) if method == "int8" else quantize_int4(w_IO, group_size, symmetric)
    return out


@functools.partial(jax.jit, static_argnames="cfg")
def dequantize_params(cfg: ModelConfig, params: Params, quantized: dict[str, Int8 | Int4]) -> Params:
    """``params`` with each quantised matrix replaced by its dequantised value, in that weight's dtype."""
    embeddings = "embed" in quantized
    for name, m in matrices(cfg, embeddings).items():
        w = get(params, m.path)
        params = replace(params, m.path, from_matrix(dequantize(quantized[name], w.dtype), m, w.shape))
    return params


# ----------------------------------------------------------------------------------------------------
# A quantised frozen base (QLoRA): the params tree with quantised leaves


def quantize_base(
    cfg: ModelConfig,
    params: Params,
    mode: str,
    group_size: int = 64,
    mesh: jax.sharding.Mesh | None = None,
) -> Params:
    """``params`` with each block matmul weight (``matrices(cfg)``) replaced by its quantised matrix view
    [layers, I, O] in ``mode`` ('int8', 'int4', 'nf4'); embeddings, norms, biases, heads and any LoRA
    adapters are the same arrays. ``model.apply`` / ``decode`` / ``sample.generate`` run on the result, alone
    or under ``lora.combine(adapters, qbase)``. With a ``mesh`` the quantised weights are placed as
    ``quantized_base_shardings`` says (what a step compiled from the abstract shapes expects)."""
    shardings = None if mesh is None else quantized_base_shardings(cfg, mesh, mode, group_size)
    for m in matrices(cfg).values():
        qt = quantize_matrix(as_matrix(get(params, m.path), m), mode, group_size)
        params = replace(params, m.path, qt if mesh is None else jax.device_put(qt, get(shardings, m.path)))
    return params


def _dequantized(cfg: ModelConfig, params: Params, layer: bool, dtype: Any) -> Params:
    """``params`` (a whole tree, or with ``layer`` one block's slice of it) with each quantised weight a
    plain array again, of its own shape, in ``dtype`` (None: the weight's param dtype)."""
    shapes = transformer.param_shapes(cfg)
    for m in matrices(cfg).values():
        path = m.path[1:] if layer else m.path
        qt = get(params, path)
        if is_quantized(qt):
            shape = get(shapes, m.path)
            w = dequantize(qt, dtype or shape.dtype).reshape(shape.shape[1:] if layer else shape.shape)
            params = replace(params, path, w)
    return params


def dequantize_base(cfg: ModelConfig, qparams: Params, dtype: Any = None) -> Params:
    """The dense params of a quantised base: each quantised weight dequantised in ``dtype`` (None: the
    config's param dtype), everything else as it is."""
    return _dequantized(cfg, qparams, False, dtype)


def dequantize_layer(cfg: ModelConfig, layer_params: Params) -> Params:
    """One block's params (a layer's slice of ``params['blocks']``, a pure dict) with each quantised weight
    dequantised in cfg.dtype, the dtype the layer computes in: what the layer loop merges into a Block."""
    return dense_layer(layer_params, transformer.param_shapes(cfg)["blocks"], cfg.dtype)


def round_trip(cfg: ModelConfig, params: Params, mode: str, group_size: int = 64) -> Params:
    """``params`` with each block weight quantised and dequantised again, in its own dtype and shape: the
    dense weights a quantised base computes with (e.g. a base to fold adapters trained on it into)."""
    for m in matrices(cfg).values():
        w = get(params, m.path)
        w_IO = dequantize(quantize_matrix(as_matrix(w, m), mode, group_size), w.dtype)
        params = replace(params, m.path, from_matrix(w_IO, m, w.shape))
    return params


def _base_shapes(cfg: ModelConfig) -> tuple[ModelConfig, Params]:
    """(config, ShapeDtypeStructs) of the frozen base of ``cfg``: what ``lora.split(params,
    also=head_params(cfg))`` leaves, no adapters and no scalar head."""
    base = cfg.replace(lora_rank=0) if cfg.lora_rank else cfg
    shapes = transformer.param_shapes(base)
    return base, {k: v for k, v in shapes.items() if k not in head_params(cfg)}


def quantized_base_shapes(cfg: ModelConfig, mode: str, group_size: int = 64) -> Params:
    """ShapeDtypeStructs of ``quantize_base`` of the frozen base of ``cfg`` (no adapters, no scalar head),
    allocating nothing."""
    base, shapes = _base_shapes(cfg)
    return jax.eval_shape(lambda p: quantize_base(base, p, mode, group_size), shapes)


def quantized_base_shardings(
    cfg: ModelConfig, mesh: jax.sharding.Mesh, mode: str, group_size: int = 64
) -> Params:
    """NamedShardings of ``quantized_base_shapes``. Unquantised leaves keep ``model.param_shardings``'s.
    Every array of a quantised weight ([layers, I', O]: codes, scales, zeros) takes the logical axes
    (layers, the weight's first input axis, its first output axis) through the same ``sharding.RULES``
    table, and a dim that mesh axis does not divide (a scale's 1, few groups) is replicated. The flattened
    I and O split in contiguous blocks, as the outermost of the dims they flatten does; packed int4 rows
    2i, 2i+1 stay together."""
    base, dense = _base_shapes(cfg)
    axes = {k: v for k, v in transformer.logical_axes(base).items() if k in dense}
    shapes = quantized_base_shapes(cfg, mode, group_size)
    for m in matrices(base).values():
        w_axes, qt = get(axes, m.path), get(shapes, m.path)
        matrix_axes = (w_axes[0], w_axes[1], w_axes[1 + m.n_in])
        axes = replace(axes, m.path, type(qt)(*(None if a is None else matrix_axes for a in qt)))
    return sharding.shardings_for(axes, shapes, mesh)


def quant_bytes(tree: Any) -> int:
    """Bytes of every array in ``tree`` (a params tree, a quantised one, or a mix)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def to_arrays(quantized: dict[str, Int8 | Int4]) -> dict[str, Any]:
    """{'<name>.<field>': array}: a quantised tree as flat named arrays (what ``np.savez`` stores)."""
    return {
        f"{name}.{field}": value
        for name, qt in quantized.items()
        for field, value in qt._asdict().items()
        if value is not None
    }


def from_arrays(arrays: dict[str, Any]) -> dict[str, Int8 | Int4]:
    """The inverse of ``to_arrays``."""
    out: dict[str, Int8 | Int4] = {}
    for name in sorted({k.rsplit(".", 1)[0] for k in arrays}):
        if f"{name}.q" in arrays:
            out[name] = Int8(arrays[f"{name}.q"], arrays[f"{name}.scale"])
        else:
            out[name] = Int4(arrays[f"{name}.packed"], arrays[f"{name}.scale"], arrays.get(f"{name}.zero"))
    return out
