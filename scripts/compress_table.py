"""The compression table of docs/results.md: a trained LM (the tiny task's SFT model) against bits (fp32,
int8, int4 at two group sizes, and with the embedding) and sparsity (magnitude pruning vs SparseGPT at 30 /
50 / 70 % and 2:4), each compressed with scripts/compress.py's library call into its own workdir, loaded back
with ``checkpoint.load_model`` and measured with the evaluators: held-out text loss (``text_loss``, 8
validation batches of 32 x 128 tokens) and held-out gold reward (``gold``: 200 prompts x 8 samples at
temperature 1 with the standard error over prompts, the difference to fp32 paired by prompt, and greedy);
the bytes of each compressed form; and generation speed of the packed forms beside fp32 (``speed``).

    python scripts/compress_table.py --checkpoint runs/tiny/sft --out_dir runs/compress_table

Workdirs already in --out_dir are reused (delete one to redo it); the results land in
``--out_dir/table.json`` and the markdown table on stdout.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import time

import jax
import numpy as np

from gptjax import checkpoint, evals
from gptjax.evals import evaluate
from gptjax.model import quant, sample
from gptjax.research import compress

VARIANTS = (  # name, method, options
    ("fp32", None, {}),
    ("int8", "int8", {}),
    ("int4 g32", "int4", {"group_size": 32}),
    ("int4 g128", "int4", {"group_size": 128}),
    ("int4 g32 +embed", "int4", {"group_size": 32, "embeddings": True}),  # the token embedding too
    *(
        (f"{method} {label}", method, opts)
        for method in ("magnitude", "sparsegpt")
        for label, opts in (
            ("30%", {"sparsity": 0.3}),
            ("50%", {"sparsity": 0.5}),
            ("70%", {"sparsity": 0.7}),
            ("2:4", {"pattern": "2:4"}),
        )
    ),
)


SPEED = ("int8", "int4 g32")  # the packed forms timed beside fp32


def slug(name: str) -> str:
    """A variant's workdir name: 'sparsegpt 2:4' -> 'sparsegpt_2_4'."""
    return re.sub(r"[^0-9a-z]+", "_", name).strip("_")


def measure(cfg, params, vocab, args) -> dict:
    inputs = evals.Inputs.of_models({"policy": (cfg, params)}, vocab)
    out = evals.measure("text_loss", inputs, seq_len=args.seq_len, batches=args.text_batches)
    out.update(evals.measure("gold", inputs, prompts=args.prompts, samples=args.samples))
    return out


def speed(cfg, params, packed: dict, args) -> dict[str, float]:
    """Generated tokens/s of fp32 and of each packed form dequantised inside the jitted call (XLA computes
    the weights once a call, before the decode loop), and the milliseconds of that dequantisation alone.
    A compressed workdir holds the dequantised weights: it loads as fp32 arrays and runs at the fp32 speed.
    The calls take turns, ``args.speed_repeats`` rounds after a compile; the best round counts (this CPU is
    shared: the slower rounds measure the neighbours)."""
    B, P, T = args.speed_batch, 16, args.speed_tokens
    prompts = np.random.default_rng(0).integers(1, 250, (B, P)).astype(np.int32)
    gen = functools.partial(sample.generate, cfg, prompts_BP=prompts, max_new_tokens=T, temperature=0.0)
    from_codes = jax.jit(lambda params, q, rng: gen(quant.dequantize_params(cfg, params, q), rng=rng))
    dequantize = jax.jit(lambda params, q: quant.dequantize_params(cfg, params, q))
    calls = {"fp32": lambda: gen(params, rng=jax.random.key(0))}
    for name, q in packed.items():
        calls[name] = functools.partial(from_codes, params, q, jax.random.key(0))
        calls[f"{name} dequantise only"] = functools.partial(dequantize, params, q)
    times = {name: [] for name in calls}
    for fn in calls.values():
        jax.block_until_ready(fn())
    for _ in range(args.speed_repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: (1e3 * min(t) if name.endswith("only") else B * T / min(t)) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the trained workdir (an LM)")
    p.add_argument("--out_dir", required=True, help="where the compressed workdirs and table.json go")
    p.add_argument("--calibration", type=int, default=128, help="SparseGPT calibration sequences")
    p.add_argument("--prompts", type=int, default=200, help="gold: held-out prompts")
    p.add_argument("--samples", type=int, default=8, help="gold: samples per prompt")
    p.add_argument("--seq_len", type=int, default=128, help="text_loss: sequence length")
    p.add_argument("--text_batches", type=int, default=8, help="text_loss: validation batches of 32")
    p.add_argument("--speed_batch", type=int, default=16)
    p.add_argument("--speed_tokens", type=int, default=64)
    p.add_argument("--speed_repeats", type=int, default=9)
    p.add_argument("--from_json", action="store_true", help="print the table of --out_dir/table.json only")
    args = p.parse_args()
    if args.from_json:
        with open(os.path.join(args.out_dir, "table.json")) as f:
            print(markdown(json.load(f)))
        return
    t_start = time.perf_counter()
    os.makedirs(args.out_dir, exist_ok=True)
    vocab = checkpoint.load_vocabulary(args.checkpoint)
    rows = {}
    for name, method, opts in VARIANTS:
        path = args.checkpoint if method is None else os.path.join(args.out_dir, slug(name))
        if method is not None and not os.path.isfile(os.path.join(path, "compression.json")):
            compress.compress_workdir(args.checkpoint, path, method, calibration=args.calibration, **opts)
        record = {}
        if method is not None:
            with open(os.path.join(path, "compression.json")) as f:
                record = json.load(f)
        cfg, params = checkpoint.load_model(path)
        t0 = time.perf_counter()
        result = measure(cfg, params, vocab, args)
        rows[name] = {
            "record": {k: v for k, v in record.items() if k != "matrices"},
            **{k: v for k, v in result.items() if k != "samples"},
            "eval_seconds": time.perf_counter() - t0,
        }
        print(
            f"{name}: text loss {result['text_loss']:.4f}, gold {result['gold_reward_mean']:.3f}", flush=True
        )
    cfg, params = checkpoint.load_model(args.checkpoint)
    packed = {n: compress.load_quantized(os.path.join(args.out_dir, slug(n))) for n in SPEED}
    rows["speed"] = speed(cfg, params, packed, args)
    rows["speed_shape"] = f"{args.speed_batch} rows x {args.speed_tokens} new tokens"
    rows["seconds"] = time.perf_counter() - t_start
    with open(os.path.join(args.out_dir, "table.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(markdown(rows))


HEADER = (
    "| form | sparsity | text loss (Δ) | gold sampled (Δ paired) | greedy gold | MiB (÷ fp32) | compress s |",
    "|---|---|---|---|---|---|---|",
)


def markdown(rows: dict) -> str:
    base = rows["fp32"]
    fp32_bytes = next(r["record"]["bytes_fp32"] for name, *_ in VARIANTS if (r := rows[name])["record"])
    lines = list(HEADER)
    for name, _, _ in VARIANTS:
        r = rows[name]
        rec = r["record"]
        d, se = evaluate.paired_difference(r, base)
        size = rec.get("bytes_compressed", fp32_bytes)
        cells = (
            name,
            f"{rec['sparsity']:.3f}" if rec.get("method") in ("magnitude", "sparsegpt") else "-",
            f"{r['text_loss']:.4f} ({r['text_loss'] - base['text_loss']:+.4f})",
            f"{r['gold_reward_mean']:.3f} +- {r['gold_reward_se']:.3f} ({d:+.3f} +- {se:.3f})",
            f"{r['greedy_gold_reward']:.3f}",
            f"{size / 2**20:.2f} ({size / fp32_bytes:.3f})",
            f"{rec.get('seconds', 0.0):.1f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    speeds = ", ".join(
        f"{k}: {v:.1f} ms" if k.endswith("only") else f"{k}: {v:.0f} tokens/s"
        for k, v in rows["speed"].items()
    )
    lines += [
        "",
        f"Generation (greedy, {rows['speed_shape']}): {speeds}. Whole table: {rows['seconds']:.0f} s.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
