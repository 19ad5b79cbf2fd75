"""Post-training compression of a finished model: weight-only int8 / int4 (``gptjax.model.quant``), magnitude
pruning (unstructured or N:M) and SparseGPT, and one call that compresses a workdir into another.

    params, record, packed = compress(cfg, params, "sparsegpt", sparsity=0.5, calibration=batch)
    record = compress_workdir("runs/sft", "runs/sft_int4", "int4", group_size=64)

Masks are boolean [(layers,) I, O] arrays over a weight's matrix view (``quant.as_matrix``), True where a
weight is pruned. N:M keeps N of each M consecutive inputs of an output column (2:4: what sparse tensor cores
run).

SparseGPT (Frantar & Alistarh 2023) prunes each matrix to minimise its layer's output error ||X W - X W'||^2
over calibration inputs X [tokens, I]: with H = X^T X + lambda mean(diag) 1 and U the upper Cholesky factor
of H^-1, inputs are processed in order; pruning input row j's weights in a column changes the later rows of
that column by -U[j, j:] (w_j - q_j) / U[j, j] (the OBS update restricted to weights not yet processed), and
the rows of a block of ``block_size`` inputs choose their mask together, at the block's start, by the
smallest w^2 / U[j, j]^2 (N:M: every M rows). Layers are pruned in order, each on the outputs of the already
pruned layers before it; the matrices of one block are pruned on the inputs that block had before any of
them was pruned (the paper's per-block procedure).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from gptjax import checkpoint, data, model
from gptjax.interop import lora
from gptjax.model import attention as attn_lib
from gptjax.model import layers, quant, transformer
from gptjax.train.state import TrainState

Params = dict[str, Any]
METHODS = ("int8", "int4", "magnitude", "sparsegpt")
# The block input each matrix reads (what its Hessian is built from).
INPUT_OF = dict(wq="attn", wk="attn", wv="attn", wo="wo", w_in="mlp", w_gate="mlp", w_out="w_out")


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4); None or '' -> None."""
    if not pattern:
        return None
    n, m = (int(x) for x in pattern.split(":"))
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: use N:M with 0 < N < M (e.g. 2:4)")
    return n, m


# ----------------------------------------------------------------------------------------------------
# Masks


def smallest_mask(score: np.ndarray, k: int) -> np.ndarray:
    """True at exactly the ``k`` smallest entries of ``score`` (any shape)."""
    flat = np.zeros(score.size, bool)
    if k > 0:
        flat[np.argpartition(score.ravel(), k - 1)[:k]] = True
    return flat.reshape(score.shape)


def nm_mask(score_IO: np.ndarray, n: int, m: int) -> np.ndarray:
    """Prune the M - N smallest of each M consecutive inputs of every column: [..., I, O] -> mask."""
    *lead, n_in, n_out = score_IO.shape
    if n_in % m:
        raise ValueError(f"N:M pruning: {n_in} inputs are not a multiple of M={m}")
    s = score_IO.reshape(*lead, n_in // m, m, n_out)
    rank = np.argsort(np.argsort(s, axis=-2, kind="stable"), axis=-2, kind="stable")
    return (rank < m - n).reshape(score_IO.shape)


def magnitude_masks(
    mats: dict[str, np.ndarray], sparsity: float, nm: tuple[int, int] | None = None, scope: str = "matrix"
) -> dict[str, np.ndarray]:
    """Masks of the smallest |w|: exactly round(sparsity * size) of each [I, O] matrix (``scope`` 'matrix',
    each layer's matrix on its own) or of all of them together ('global'); or the N:M pattern."""
    if nm is not None:
        return {name: nm_mask(np.abs(w), *nm) for name, w in mats.items()}
    if scope == "matrix":
        out = {}
        for name, w in mats.items():
            w2 = np.abs(w).reshape(-1, *w.shape[-2:])
            k = round(sparsity * w2[0].size)
            out[name] = np.stack([smallest_mask(x, k) for x in w2]).reshape(w.shape)
        return out
    if scope != "global":
        raise ValueError(f"scope={scope!r}: use 'matrix' or 'global'")
    flat = np.concatenate([np.abs(w).ravel() for w in mats.values()])
    mask = smallest_mask(flat, round(sparsity * flat.size))
    out, at = {}, 0
    for name, w in mats.items():
        out[name], at = mask[at : at + w.size].reshape(w.shape), at + w.size
    return out


# ----------------------------------------------------------------------------------------------------
# SparseGPT on one matrix


def hessian(x: np.ndarray) -> np.ndarray:
    """X^T X of a layer's inputs ``x`` [tokens, I], in float64."""
    x = np.asarray(x, np.float64)
    return x.T @ x


def inverse_cholesky(h_II: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper-triangular U with U^T U = (H + damp * mean(diag H) * 1)^-1."""
    h = np.array(h_II, np.float64)
    mean_diag = float(np.mean(np.diag(h)))
    h[np.diag_indices_from(h)] += damp * (mean_diag if mean_diag > 0 else 1.0)
    h_inv = np.linalg.inv(h)
    return np.linalg.cholesky(h_inv).T


def sparsegpt_matrix(
    w_IO: np.ndarray,
    h_II: np.ndarray | None = None,
    *,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    mask_IO: np.ndarray | None = None,
    u_II: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(pruned w_IO, mask) of one matrix (module doc) given its inputs' H = X^T X (or ``u_II``, the factor
    ``inverse_cholesky`` made of it). Unstructured: exactly round(sparsity * I * O) weights go, those of
    each block chosen at its start (the block's share rounded so the total is exact). ``mask_IO`` fixes the
    mask (only the updates then run)."""
    u = inverse_cholesky(h_II, damp) if u_II is None else u_II
    w = np.array(w_IO, np.float64)
    n_in, n_out = w.shape
    if nm is not None and block_size % nm[1]:
        raise ValueError(f"block_size {block_size} is not a multiple of M={nm[1]}")
    mask = np.zeros(w.shape, bool) if mask_IO is None else np.asarray(mask_IO, bool)
    for i0 in range(0, n_in, block_size):
        i1 = min(i0 + block_size, n_in)
        w1, u1, err = w[i0:i1], u[i0:i1, i0:i1], np.zeros((i1 - i0, n_out))
        d = np.diag(u1)[:, None]
        if mask_IO is None and nm is None:
            k = round(sparsity * i1 * n_out) - round(sparsity * i0 * n_out)
            mask[i0:i1] = smallest_mask(w1**2 / d**2, k)
        for j in range(i1 - i0):
            if mask_IO is None and nm is not None and j % nm[1] == 0:
                rows = slice(j, j + nm[1])
                mask[i0 + j : i0 + j + nm[1]] = nm_mask(w1[rows] ** 2 / d[rows] ** 2, *nm)
            q = np.where(mask[i0 + j], 0.0, w1[j])
            err[j] = (w1[j] - q) / u1[j, j]
            w1[j:] -= np.outer(u1[j, j:], err[j])
            w1[j] = q
        w[i1:] -= u[i0:i1, i1:].T @ err  # the later blocks' rows, updated once per block
    return w.astype(np.asarray(w_IO).dtype), mask


# ----------------------------------------------------------------------------------------------------
# Calibration: each block's matrix inputs, block by block


@functools.lru_cache(maxsize=8)
def _graphdefs(cfg: model.ModelConfig):
    """The model's and one block's graph definitions (merged with params, they run the model's own code)."""
    gpt = nnx.split(nnx.eval_shape(lambda: transformer.GPT(cfg, nnx.Rngs(0))))[0]
    return gpt, nnx.split(nnx.eval_shape(lambda: layers.Block(cfg, nnx.Rngs(0))))[0]


@functools.partial(jax.jit, static_argnums=0)
def embed(cfg: model.ModelConfig, params: Params, tokens_BL, positions_BL) -> jax.Array:
    """The first block's input: the model's own ``embed_tokens``."""
    return nnx.merge(_graphdefs(cfg)[0], params).embed_tokens(tokens_BL, positions_BL)


def _mlp_hidden(mlp, cfg: model.ModelConfig, x_BLD):
    """The MLP's activations, w_out's input (as ``layers.MLP``)."""
    h = layers.dense(x_BLD, mlp.w_in[...].astype(x_BLD.dtype))
    if cfg.mlp_bias:
        h = h + mlp.b_in[...].astype(h.dtype)
    if cfg.gated:
        gate = layers.dense(x_BLD, mlp.w_gate[...].astype(x_BLD.dtype))
        return (jax.nn.silu(gate) if cfg.mlp == "swiglu" else jax.nn.gelu(gate, approximate=True)) * h
    if cfg.mlp == "relu":
        return jax.nn.relu(h)
    return jax.nn.gelu(h, approximate=cfg.mlp == "gelu")


@functools.partial(jax.jit, static_argnums=0)
def block_inputs(cfg: model.ModelConfig, layer_params: Params, x_BLD, positions_BL, segment_ids_BL):
    """(the block's output, {input name: what its matrices read}, the largest difference between that output
    and the block re-run from those inputs) for one layer's params.

    The output is the model's own block; the inputs come from a re-run of its steps (the model keeps no
    intermediates), so the difference says whether the re-run still mirrors the block (``sparsegpt_model``
    refuses a model it does not)."""
    blk = nnx.merge(_graphdefs(cfg)[1], layer_params)
    out_BLD = blk(x_BLD, positions_BL, segment_ids_BL)
    xa = blk.attn_norm(x_BLD)
    q, k, v = blk.attn.qkv(xa, positions_BL)
    o = attn_lib.attention(q, k, v, impl=cfg.attention_impl, causal=True, segment_ids_BL=segment_ids_BL)
    x = x_BLD + blk.attn.out(o)
    xm = blk.mlp_norm(x)
    h = _mlp_hidden(blk.mlp, cfg, xm)
    y = layers.dense(h, blk.mlp.w_out[...].astype(h.dtype))
    rerun_BLD = x + (y + blk.mlp.b_out[...].astype(y.dtype) if cfg.mlp_bias else y)
    inputs = {"attn": xa, "wo": o.reshape(*o.shape[:2], -1), "mlp": xm, "w_out": h}
    return out_BLD, inputs, jnp.max(jnp.abs(rerun_BLD - out_BLD).astype(jnp.float32))


def calibration_batch(data_cfg, n: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` packed rows of pretraining text (training split): inputs, positions, segment ids."""
    it = data.make_iterator(data_cfg, stage="pretrain", batch_size=n, seq_len=seq_len, seed=seed)
    return next(it)


def sparsegpt_model(
    cfg: model.ModelConfig,
    params: Params,
    calibration: dict[str, np.ndarray],
    *,
    sparsity: float = 0.5,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[Params, dict[str, np.ndarray]]:
    """(pruned params, {name: mask [layers, I, O]}) of every block matrix, layer after layer."""
    tokens, seg = jnp.asarray(calibration["inputs_BL"]), jnp.asarray(calibration["segment_ids_BL"])
    pos = jnp.asarray(calibration["positions_BL"])
    real = np.asarray(seg).ravel() > 0  # padding rows of a packed batch are not calibration text
    mats = quant.matrices(cfg)
    blocks = {name: np.array(quant.as_matrix(quant.get(params, m.path), m)) for name, m in mats.items()}
    masks = {name: np.zeros(w.shape, bool) for name, w in blocks.items()}
    x_BLD = embed(cfg, params, tokens, pos)
    for layer in range(cfg.n_layers):
        layer_params = jax.tree.map(lambda a, i=layer: a[i], params["blocks"])
        out_BLD, inputs, off = block_inputs(cfg, layer_params, x_BLD, pos, seg)
        scale = max(1.0, float(jnp.max(jnp.abs(out_BLD))))
        if float(off) > (1e-4 if jnp.dtype(cfg.dtype) == jnp.float32 else 3e-2) * scale:
            raise NotImplementedError(
                f"sparsegpt: re-running layer {layer} of this model from its matrices' inputs is off by "
                f"{float(off):.3g}: compress.block_inputs does not mirror this architecture's block"
            )
        factors = {}
        for name, w in blocks.items():
            src = INPUT_OF[name]
            if src not in factors:
                x_in = np.asarray(inputs[src], np.float32).reshape(-1, inputs[src].shape[-1])[real]
                factors[src] = inverse_cholesky(hessian(x_in), damp)
            w[layer], masks[name][layer] = sparsegpt_matrix(
                w[layer], sparsity=sparsity, nm=nm, block_size=block_size, u_II=factors[src]
            )
        params = _with_matrices(cfg, params, blocks)
        layer_params = jax.tree.map(lambda a, i=layer: a[i], params["blocks"])
        x_BLD, _, _ = block_inputs(cfg, layer_params, x_BLD, pos, seg)  # the next layer sees this pruned one
    return params, masks


def _with_matrices(cfg, params: Params, mats: dict[str, np.ndarray]) -> Params:
    for name, m in quant.matrices(cfg, "embed" in mats).items():
        if name in mats:
            w = quant.get(params, m.path)
            params = quant.replace(
                params, m.path, quant.from_matrix(jnp.asarray(mats[name], w.dtype), m, w.shape)
            )
    return params


# ----------------------------------------------------------------------------------------------------
# A model


def compress(
    cfg: model.ModelConfig,
    params: Params,
    method: str,
    *,
    sparsity: float = 0.5,
    pattern: str | None = None,
    group_size: int = 64,
    symmetric: bool = True,
    embeddings: bool = False,
    scope: str = "matrix",
    calibration: dict[str, np.ndarray] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[Params, dict[str, Any], dict[str, quant.Int8 | quant.Int4] | None]:
    """(params in the model's dtype, the record, the packed int8 / int4 matrices or None) of ``method``.

    The record: per matrix (and layer) its shape and achieved sparsity (int8 / int4: the share of weights
    that round to 0), and the bytes of the whole model in fp32, as stored (dense, the model's dtype) and in
    the compressed form (int8 / int4: the packed matrices plus the rest as stored; pruning: kept values plus
    a 1-bit mask per weight, or for N:M 2 bits of position per kept weight, the hardware's format).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r}; use one of {METHODS}")
    nm = parse_pattern(pattern)
    if method == "sparsegpt" and embeddings:
        raise ValueError("sparsegpt prunes the blocks' matrices only (the embedding has no layer input)")
    if method == "sparsegpt" and calibration is None:
        raise ValueError("sparsegpt needs calibration data")
    mats = quant.matrices(cfg, embeddings)
    packed = None
    if method in ("int8", "int4"):
        packed = quant.quantize_params(
            cfg, params, method, group_size=group_size, symmetric=symmetric, embeddings=embeddings
        )
        out = quant.dequantize_params(cfg, params, packed)
    elif method == "magnitude":
        views = {name: np.asarray(quant.as_matrix(quant.get(params, m.path), m)) for name, m in mats.items()}
        masks = magnitude_masks(views, sparsity, nm, scope)
        out = _with_matrices(cfg, params, {n: np.where(masks[n], 0.0, w) for n, w in views.items()})
    else:
        out, _ = sparsegpt_model(
            cfg, params, calibration, sparsity=sparsity, nm=nm, block_size=block_size, damp=damp
        )
    record = _record(cfg, params, out, packed, method, mats, nm)
    record.update(
        method=method,
        bits={"int8": 8, "int4": 4}.get(method, jnp.dtype(cfg.param_dtype).itemsize * 8),
        group_size=group_size if method == "int4" else None,
        symmetric=symmetric if method in ("int8", "int4") else None,
        embeddings=embeddings,
        sparsity_requested=None if nm or method not in ("magnitude", "sparsegpt") else sparsity,
        pattern=pattern if method in ("magnitude", "sparsegpt") else None,
    )
    return out, record, packed


def _record(cfg, before: Params, after: Params, packed, method: str, mats, nm) -> dict[str, Any]:
    total_fp32 = sum(np.size(x) * 4 for x in jax.tree.leaves(before))
    stored = quant.quant_bytes(after)
    per_matrix, zeros, size, touched = {}, 0, 0, 0
    for name, m in mats.items():
        w = np.asarray(quant.as_matrix(quant.get(after, m.path), m))
        touched += quant.quant_bytes(quant.get(before, m.path))
        for i, w_l in enumerate(w.reshape(-1, *w.shape[-2:])):
            key = name if w.ndim == 2 else f"layer_{i}/{name}"
            per_matrix[key] = {"shape": "x".join(map(str, w_l.shape)), "sparsity": float(np.mean(w_l == 0))}
            zeros, size = zeros + int(np.sum(w_l == 0)), size + w_l.size
    if packed is not None:
        compressed = stored - touched + quant.quant_bytes(packed)
    elif method in ("magnitude", "sparsegpt"):
        item = jnp.dtype(cfg.param_dtype).itemsize
        kept = size - zeros
        sparse = kept * item + (kept * 2 + 7) // 8 if nm else kept * item + (size + 7) // 8
        compressed = stored - touched + sparse
    else:
        compressed = stored
    return {
        "matrices": per_matrix,
        "sparsity": zeros / size,
        "bytes_fp32": total_fp32,
        "bytes_stored": stored,
        "bytes_compressed": compressed,
        "ratio_to_fp32": compressed / total_fp32,
    }


# ----------------------------------------------------------------------------------------------------
# A workdir


def calibration_data(run_config: dict | None) -> ConfigDict:
    """Calibration text for a run (what the text_loss evaluator measures on, its training split): its
    PPO-ptx text, its own data for a pretraining run, else the tiny task's pretraining text."""
    run = run_config or {}
    if (run.get("ptx") or {}).get("data"):
        return ConfigDict(run["ptx"]["data"])
    if run.get("stage") == "pretrain" and run.get("data"):
        return ConfigDict(run["data"])
    return data.tiny_config("pretrain")


def compress_workdir(
    src: str,
    out: str,
    method: str,
    *,
    role: str | None = None,
    ema: bool = False,
    step: int | None = None,
    calibration: int = 128,
    seed: int = 0,
    **options: Any,
) -> dict[str, Any]:
    """Compress the model in workdir ``src`` (a role, its EMA; LoRA adapters merged first) and write the
    result to ``out`` as a model-only workdir of dequantised / pruned weights in the model's dtype (read
    unchanged by every tool), with ``compression.json`` (the record) and, for int8 / int4,
    ``quantized.npz`` (the packed matrices, ``load_quantized``). ``options``: ``compress``'s. Returns the
    record."""
    t0 = time.perf_counter()
    step, meta = checkpoint.load_meta(src, step)
    cfg, params = checkpoint.load_model(src, step, role=role, ema=ema)
    cfg, params = lora.merge(cfg, params)
    params = jax.tree.map(np.asarray, params)
    run = meta.get("config")
    run = json.loads(run) if isinstance(run, str) else run
    batch = None
    if method == "sparsegpt":
        seq_len = int(((run or {}).get("train") or {}).get("seq_len") or cfg.max_len)
        batch = calibration_batch(calibration_data(run), calibration, min(seq_len, cfg.max_len), seed)
    new, record, packed = compress(cfg, params, method, calibration=batch, **options)
    record.update(
        source=os.path.abspath(src),
        step=step,
        role=role,
        ema=ema,
        calibration_sequences=calibration if method == "sparsegpt" else None,
        seconds=time.perf_counter() - t0,
    )
    write_model(out, cfg, new, step, meta, record)
    if packed is not None:
        np.savez(os.path.join(out, "quantized.npz"), **quant.to_arrays(packed))
    with open(os.path.join(out, "compression.json"), "w") as f:
        json.dump(record, f, indent=1)
    tok = os.path.join(src, "tokenizer")
    if os.path.isdir(tok):
        shutil.copytree(tok, os.path.join(out, "tokenizer"))
    return record


def write_model(
    out: str, cfg: model.ModelConfig, params: Params, step: int, src_meta: dict, record: dict
) -> None:
    """A model-only workdir (as an HF import writes one): a checkpoint at ``step`` whose meta keeps the
    source run's stage and config (vocabulary, sequence length) and adds the compression summary."""
    mngr = checkpoint.manager(out)
    if mngr.latest_step() is not None:
        raise FileExistsError(f"{out} already holds checkpoints; pick a new --out directory")
    summary = {k: v for k, v in record.items() if k != "matrices"}
    extra = {"config": src_meta["config"]} if src_meta.get("config") else {}
    meta = checkpoint.meta_for(cfg, src_meta.get("stage", "compressed"), compression=summary, **extra)
    state = TrainState(step=jnp.int32(step), params=params, opt_state={})
    checkpoint.save(mngr, state, data_state=None, meta=meta)
    mngr.wait_until_finished()


def load_quantized(path: str) -> dict[str, quant.Int8 | quant.Int4]:
    """The packed matrices of a compressed workdir (``quantized.npz``): {name: Int8 | Int4}."""
    with np.load(os.path.join(path, "quantized.npz")) as f:
        return quant.from_arrays(dict(f))
