"""Compression of a finished model: int8 / int4 against plain-numpy references (codes, scales, packing, error
bounds, bytes), magnitude and N:M masks' exact counts, SparseGPT on one layer against least squares and a
brute-force search over masks, the block-by-block re-run against the model, and scripts/compress.py end to
end on a tiny random workdir (its output loads, generates and exports)."""

import importlib.util
import itertools
import json
import os

import jax
import numpy as np
import pytest
from absl import flags
from helpers import ROOT, random_params, save_workdir

from gptjax import checkpoint, hf, model
from gptjax.model import layers, quant, sample
from gptjax.research import compress

# ----------------------------------------------------------------------------------------------------
# Plain-numpy references


def int8_reference(w_IO):
    """(codes, scale) column by column: scale = max|w| / 127 (1 for an all-zero column)."""
    codes, scale = np.zeros(w_IO.shape, np.int8), np.ones((1, w_IO.shape[1]), np.float32)
    for o in range(w_IO.shape[1]):
        m = np.abs(w_IO[:, o]).max()
        s = np.float32(m / 127) if m > 0 else np.float32(1)
        scale[0, o] = s
        codes[:, o] = np.clip(np.round(w_IO[:, o] / s), -127, 127)
    return codes, scale


def int4_reference(w_IO, g, symmetric):
    """(codes in [0, 16), fp16 scales, zero points) group by group."""
    n_in, n_out = w_IO.shape
    codes = np.zeros(w_IO.shape, np.uint8)
    scale, zero = np.ones((n_in // g, n_out), np.float16), np.full((n_in // g, n_out), 8, np.uint8)
    for k, o in itertools.product(range(n_in // g), range(n_out)):
        x = w_IO[k * g : (k + 1) * g, o]
        if symmetric:
            s = np.float16(np.abs(x).max() / 7) or np.float16(1)
            c = np.clip(np.round(x / np.float32(s)), -8, 7) + 8
        else:
            lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
            s = np.float16((hi - lo) / 15) or np.float16(1)
            zero[k, o] = np.clip(np.round(-lo / np.float32(s)), 0, 15)
            c = np.clip(np.round(x / np.float32(s)) + zero[k, o], 0, 15)
        scale[k, o], codes[k * g : (k + 1) * g, o] = s, c
    return codes, scale, zero


def test_int8_against_the_reference_with_known_values_and_error_bound():
    w = np.random.default_rng(0).normal(0, 0.05, (2, 24, 5)).astype(np.float32)  # [layers, I, O]
    w[1, :, 3] = 0.0  # an all-zero channel
    w[0, :3, 0] = [1.27, -0.5, 0.01]  # scale 0.01: codes 127, -50, 1
    w[0, 3:, 0] = 0.0
    qt = quant.quantize_int8(w)
    assert qt.q.dtype == np.int8 and qt.scale.shape == (2, 1, 5)
    np.testing.assert_array_equal(np.asarray(qt.q[0, :3, 0]), [127, -50, 1])
    for layer in range(2):
        codes, scale = int8_reference(w[layer])
        np.testing.assert_array_equal(np.asarray(qt.q[layer]), codes)
        np.testing.assert_allclose(np.asarray(qt.scale[layer]), scale, rtol=1e-7)
    back = np.asarray(quant.dequantize(qt, np.float32))
    assert np.all(np.abs(back - w) <= np.asarray(qt.scale) / 2 + 1e-8)  # half a step per channel
    assert np.all(back[1, :, 3] == 0.0)
    assert quant.quant_bytes(qt) == 2 * 24 * 5 + 2 * 5 * 4  # a byte a weight + fp32 channel scales


def test_int4_packing_known_values_and_round_trip():
    codes = np.array([[1, 15], [2, 0], [15, 7], [0, 8]], np.uint8)  # [I=4, O=2]
    packed = np.asarray(quant.pack_nibbles(codes))
    np.testing.assert_array_equal(packed, [[0x21, 0x0F], [0x0F, 0x87]])  # input 2i low nibble, 2i+1 high
    every = np.arange(256, dtype=np.uint8).reshape(128, 2)
    np.testing.assert_array_equal(np.asarray(quant.pack_nibbles(quant.unpack_nibbles(every))), every)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_against_the_reference_with_error_bound(symmetric):
    g, w = 8, np.random.default_rng(1).normal(0.01, 0.05, (32, 6)).astype(np.float32)
    w[8:16, 2] = 0.0  # an all-zero group
    qt = quant.quantize_int4(w, group_size=g, symmetric=symmetric)
    codes, scale, zero = int4_reference(w, g, symmetric)
    assert qt.packed.shape == (16, 6) and qt.scale.dtype == np.float16 and qt.scale.shape == (4, 6)
    np.testing.assert_array_equal(np.asarray(quant.unpack_nibbles(qt.packed)), codes)
    np.testing.assert_array_equal(np.asarray(qt.scale), scale)
    if symmetric:
        assert qt.zero is None
    else:
        np.testing.assert_array_equal(np.asarray(qt.zero), zero)
    back = np.asarray(quant.dequantize(qt, np.float32))
    want = (codes.astype(np.float32) - np.repeat(zero, g, 0)) * np.repeat(scale.astype(np.float32), g, 0)
    np.testing.assert_allclose(back, want, rtol=1e-6, atol=1e-8)
    step = np.repeat(scale.astype(np.float32), g, 0)
    # half a step, and for asymmetric groups up to half a step more (the zero point is rounded)
    assert np.all(np.abs(back - w) <= step * (0.5 if symmetric else 1.0) * 1.001 + 1e-8)
    assert np.all(back[8:16, 2] == 0.0)
    assert quant.quant_bytes(qt) == 32 * 6 // 2 + 2 * 4 * 6 + (0 if symmetric else 4 * 6)


# ----------------------------------------------------------------------------------------------------
# Masks


def test_magnitude_masks_have_exact_counts_and_prune_the_smallest():
    r = np.random.default_rng(2)
    mats = {"a": r.normal(size=(2, 16, 12)), "b": 3 * r.normal(size=(2, 16, 8))}
    per = compress.magnitude_masks(mats, 0.3)
    for name, w in mats.items():
        for layer in range(2):
            m, a = per[name][layer], np.abs(w[layer])
            assert m.sum() == round(0.3 * a.size) and a[m].max() <= a[~m].min()
    glob = compress.magnitude_masks(mats, 0.7, scope="global")
    assert sum(m.sum() for m in glob.values()) == round(0.7 * (2 * 16 * 12 + 2 * 16 * 8))
    assert glob["a"].mean() > glob["b"].mean()  # one threshold: the smaller matrix loses more
    nm = compress.magnitude_masks(mats, 0.0, nm=(2, 4))["a"]
    groups_m, groups_w = nm.reshape(2, 4, 4, 12), np.abs(mats["a"]).reshape(2, 4, 4, 12)
    assert np.all(groups_m.sum(axis=2) == 2)  # 2 of every 4 consecutive inputs of each column
    pruned_max = np.where(groups_m, groups_w, -np.inf).max(axis=2)
    assert np.all(pruned_max <= np.where(groups_m, np.inf, groups_w).min(axis=2))


# ----------------------------------------------------------------------------------------------------
# SparseGPT on one layer


def layer(seed, n_in, n_out, tokens=256):
    """Inputs X [T, I] like a transformer's (feature scales spread over orders of magnitude, mildly mixed)
    and weights [I, O]."""
    r = np.random.default_rng(seed)
    mix = np.eye(n_in) + r.normal(0, 0.3 / np.sqrt(n_in), (n_in, n_in))
    x = (r.normal(size=(tokens, n_in)) @ mix) * np.exp(r.normal(0, 1, n_in))
    return x, r.normal(size=(n_in, n_out))


def output_error(x, w, w_new):
    return float(np.sum((x @ (w - w_new)) ** 2))


def least_squares(x, w, mask):
    """The best weights for ``mask``, column by column: min ||X w - X w'|| with w' = 0 where pruned."""
    out = np.zeros_like(w)
    for o in range(w.shape[1]):
        keep = ~mask[:, o]
        out[keep, o] = np.linalg.lstsq(x[:, keep], x @ w[:, o], rcond=None)[0]
    return out


def sparsegpt_reference(w, h, damp, block_size, sparsity=0.5, nm=None):
    """SparseGPT without its shortcuts: at input j, the inverse Hessian of the inputs not yet processed
    (j..I-1) inverted afresh; the OBS update of removing w_j spread over them; each block's mask chosen at its
    start by the OBS saliency w_k^2 / [inverse of H over k..I-1]_kk (N:M: every M rows), which is the
    paper's w^2 / U_kk^2 with U its Cholesky factor."""
    w, n_in = w.copy(), w.shape[0]
    h = h + damp * np.mean(np.diag(h)) * np.eye(n_in)
    inv_diag = np.array([np.linalg.inv(h[k:, k:])[0, 0] for k in range(n_in)])[:, None]
    mask = np.zeros(w.shape, bool)
    for j in range(n_in):
        if nm is None and j % block_size == 0:
            i0, i1 = j, min(j + block_size, n_in)
            k = round(sparsity * i1 * w.shape[1]) - round(sparsity * i0 * w.shape[1])
            mask[i0:i1] = compress.smallest_mask(w[i0:i1] ** 2 / inv_diag[i0:i1], k)
        if nm is not None and j % nm[1] == 0:
            score = w[j : j + nm[1]] ** 2 / inv_diag[j : j + nm[1]]
            for o in range(w.shape[1]):
                mask[j + np.argsort(score[:, o])[: nm[1] - nm[0]], o] = True
        hinv = np.linalg.inv(h[j:, j:])
        removed = np.where(mask[j], w[j], 0.0)
        w[j:] -= np.outer(hinv[:, 0], removed / hinv[0, 0])
        w[j] = np.where(mask[j], 0.0, w[j])
    return w, mask


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_equals_its_reference_without_shortcuts(nm):
    x, w = layer(3, 16, 5)
    got, mask = compress.sparsegpt_matrix(w, compress.hessian(x), sparsity=0.5, nm=nm, block_size=8)
    want, want_mask = sparsegpt_reference(w, compress.hessian(x), 0.01, 8, nm=nm)
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)


def test_sparsegpt_updates_equal_least_squares_when_the_first_inputs_go():
    # Inputs pruned in order, each update spread over all later ones: with the pruned inputs first, the
    # sequential updates are the joint optimum; blocks of 4 exercise the once-per-block update of later rows.
    x, w = layer(4, 12, 5)
    mask = np.zeros(w.shape, bool)
    mask[:5] = True
    got, m = compress.sparsegpt_matrix(w, compress.hessian(x), mask_IO=mask, block_size=4, damp=0.0)
    np.testing.assert_array_equal(m, mask)
    assert np.all(got[:5] == 0.0)
    np.testing.assert_allclose(got, least_squares(x, w, mask), rtol=1e-6, atol=1e-8)


def test_sparsegpt_beats_magnitude_above_the_brute_force_optimum():
    # 2:4 of 8 inputs: every mask of the pattern, column by column, each with its best weights
    x, w = layer(5, 8, 6)
    choices = [c for c in itertools.product([0, 1], repeat=4) if sum(c) == 2]
    best = 0.0
    for o in range(w.shape[1]):
        masks = [np.array(a + b, bool) for a, b in itertools.product(choices, choices)]
        best += min(output_error(x, w[:, [o]], least_squares(x, w[:, [o]], m[:, None])) for m in masks)
    got, mask = compress.sparsegpt_matrix(w, compress.hessian(x), nm=(2, 4), damp=0.0)
    assert np.all(mask.reshape(2, 4, -1).sum(axis=1) == 2) and np.all(got[mask] == 0)
    mag_mask = compress.magnitude_masks({"w": w}, 0.0, nm=(2, 4))["w"]
    sgpt, mag = output_error(x, w, got), output_error(x, w, np.where(mag_mask, 0, w))
    assert best <= sgpt * (1 + 1e-9) and sgpt < 0.5 * mag

    # unstructured 50% of a wider layer: exactly half the weights, and a far smaller output error
    x, w = layer(6, 32, 16)
    got, mask = compress.sparsegpt_matrix(w, compress.hessian(x), sparsity=0.5, block_size=8)
    assert mask.sum() == 32 * 16 // 2 and np.all(got[mask] == 0) and np.all(got[~mask] != 0)
    mag_mask = compress.magnitude_masks({"w": w}, 0.5)["w"]
    assert output_error(x, w, got) < 0.5 * output_error(x, w, np.where(mag_mask, 0, w))


# ----------------------------------------------------------------------------------------------------
# A model


CFG = model.ModelConfig.gpt2(vocab_size=288, d_model=32, n_layers=2, n_heads=2, max_len=32)


def calibration(n=4, seq_len=32, seed=0):
    r = np.random.default_rng(seed)
    seg = np.ones((n, seq_len), np.int32)
    seg[0, 20:], seg[1, 28:] = 2, 0  # two packed documents, and padding
    pos = np.asarray(model.positions_from_segments(seg))
    return {"inputs_BL": r.integers(0, 259, (n, seq_len)), "segment_ids_BL": seg, "positions_BL": pos}


LLAMA = model.ModelConfig.llama(vocab_size=288, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=32)


@pytest.mark.parametrize("cfg", [CFG, LLAMA], ids=["gpt2", "llama"])
def test_block_by_block_rerun_equals_the_model(cfg):
    params, batch = random_params(cfg, 0), calibration()
    tok, pos, seg = batch["inputs_BL"], batch["positions_BL"], batch["segment_ids_BL"]
    x = compress.embed(cfg, params, tok, pos)
    for i in range(cfg.n_layers):
        x, inputs, off = compress.block_inputs(
            cfg, jax.tree.map(lambda a, i=i: a[i], params["blocks"]), x, pos, seg
        )
        assert float(off) < 1e-5  # the re-run from the matrices' inputs mirrors the model's block
        assert inputs["w_out"].shape == (4, 32, cfg.dim_ff) and inputs["wo"].shape == (4, 32, 32)
    apply = jax.jit(model.apply, static_argnums=0, static_argnames="return_hidden")
    _, want = apply(cfg, params, tok, pos, seg, return_hidden=True)
    np.testing.assert_allclose(np.asarray(x), np.asarray(want), atol=2e-5)


def test_sparsegpt_refuses_a_block_it_does_not_mirror(monkeypatch):
    # as if the model's MLP had changed under the re-run: the layer's inputs would be wrong, so no pruning
    cfg = CFG.replace(mlp="relu")
    monkeypatch.setattr(
        compress, "_mlp_hidden", lambda mlp, cfg, x: jax.nn.gelu(layers.dense(x, mlp.w_in[...]))
    )
    with pytest.raises(NotImplementedError, match="does not mirror"):
        compress.sparsegpt_model(cfg, random_params(cfg, 0), calibration())


def _script():
    spec = importlib.util.spec_from_file_location(
        "compress_script", os.path.join(ROOT, "scripts", "compress.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def main(args):  # the command line as absl parses it (flags from defaults each time)
        flags.FLAGS.unparse_flags()
        return mod.main(flags.FLAGS(["compress.py", *args]))

    return main


def test_compress_script_end_to_end(tmp_path, monkeypatch):
    # the run config fields a compressed workdir carries over: its vocabulary and sequence length
    config = json.dumps({"stage": "sft", "data": {"vocab": {"kind": "byte"}}, "train": {"seq_len": 32}})
    params = random_params(CFG, 1)
    src = save_workdir(tmp_path / "sft", "sft", params, CFG, step=5, config=config)
    monkeypatch.setattr(
        compress, "calibration_batch", lambda data_cfg, n, seq_len, seed: calibration(n, seq_len)
    )
    main = _script()
    main(
        ["--checkpoint", src, "--method", "int4", "--group_size", "16", "--embeddings"]
        + ["--out", str(tmp_path / "int4")]
    )
    main(
        ["--checkpoint", src, "--method", "sparsegpt", "--pattern", "2:4", "--calibration", "4"]
        + ["--block_size", "8", "--out", str(tmp_path / "sgpt")]
    )

    # int4: the workdir's weights are the packed codes dequantised (the embedding read as [D, V]), the rest
    # untouched
    cfg, got = checkpoint.load_model(str(tmp_path / "int4"))
    assert cfg == CFG
    packed = compress.load_quantized(str(tmp_path / "int4"))
    assert set(packed) == {"wq", "wk", "wv", "wo", "w_in", "w_out", "embed"}
    np.testing.assert_array_equal(
        got["blocks"]["mlp"]["w_out"], quant.dequantize(packed["w_out"]).reshape(2, 128, 32)
    )
    np.testing.assert_array_equal(got["embed"], quant.dequantize(packed["embed"]).T)
    np.testing.assert_array_equal(got["pos_embed"], params["pos_embed"])
    np.testing.assert_array_equal(got["blocks"]["mlp"]["b_in"], params["blocks"]["mlp"]["b_in"])
    with open(tmp_path / "int4" / "compression.json") as f:
        rec = json.load(f)
    assert rec["method"] == "int4" and rec["group_size"] == 16 and rec["bytes_compressed"] < rec["bytes_fp32"]

    # sparsegpt 2:4: exactly half of every matrix, the pattern in each
    cfg, pruned = checkpoint.load_model(str(tmp_path / "sgpt"))
    with open(tmp_path / "sgpt" / "compression.json") as f:
        rec = json.load(f)
    assert rec["sparsity"] == 0.5 and all(m["sparsity"] == 0.5 for m in rec["matrices"].values())
    w_in = np.asarray(pruned["blocks"]["mlp"]["w_in"]).reshape(2, 8, 4, 128)
    assert np.all((w_in == 0).sum(axis=2) == 2)

    # what chat / generate read (checkpoint.load_lm: the run config's vocabulary), sampling and HF export
    cfg, p, vocab = checkpoint.load_lm(str(tmp_path / "sgpt"))
    prompts = np.array([vocab.encode("ab"), vocab.encode("cd")], np.int32)
    tokens = sample.generate(cfg, p, prompts, jax.random.key(0), max_new_tokens=4, temperature=0.0)
    assert tokens.shape == (2, 4) and np.all((0 <= np.asarray(tokens)) & (np.asarray(tokens) < 288))
    hf.save(cfg, p, str(tmp_path / "hf"))
    _, back = hf.load(str(tmp_path / "hf"))
    np.testing.assert_array_equal(back["blocks"]["mlp"]["w_in"], p["blocks"]["mlp"]["w_in"])
