"""Generation tokens/s against response length: the per-token decode cost should stay flat as T grows.

    python scripts/bench_generate.py                              # the tiny LLaMA of bench_vs_hf, CPU
    python scripts/bench_generate.py --lengths 32,128,512 --batch 16 --prompt 32 --temperature 0

For each response length T, ``sample.generate`` runs B rows of P prompt tokens to exactly T new tokens (no
EOS); the table gives tokens/s and ms per decode step (one token for every row) with the prefill's share
taken out, measured from two lengths: step(T) = (time(T) - time(T0)) / (T - T0) for the shortest T0. The
cache holds P + T slots and every step attends over all of them (masked past each row's position), so
ms/step grows with T through the attention's reads of the cache, never through copies of it (the caches'
layouts let both products read it in place) and never with the step index. On the 2-core development CPU
(2026-11-27): 3.5-4 ms/step at T=64-128, 5-6.5 at 256, 8.2-8.5 at 512, where B16's cache (keys and values,
4 layers, 544 slots: 36 MB) no longer fits the 32 MB last-level cache and each step streams it from memory
(~18 GB/s here, 2 ms) and evicts the weights.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import model
from gptjax.model import sample


def tiny_llama(max_len: int) -> model.ModelConfig:
    return model.ModelConfig.llama(
        vocab_size=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=688, max_len=max_len
    )


def seconds_per_call(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="32,64,128,256,512", help="response lengths T")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scan-layers", choices=("auto", "true", "false"), default="auto")
    args = parser.parse_args()

    lengths = sorted(int(t) for t in args.lengths.split(","))
    cfg = tiny_llama(args.prompt + lengths[-1])
    if args.scan_layers != "auto":
        cfg = cfg.replace(scan_layers=args.scan_layers == "true")
    params = model.init(cfg, jax.random.key(0))
    prompts = jax.random.randint(jax.random.key(1), (args.batch, args.prompt), 1, cfg.vocab_size, jnp.int32)

    def call(T):
        def run():
            out = sample.generate(
                cfg, params, prompts, jax.random.key(2), max_new_tokens=T, temperature=args.temperature
            )
            return np.asarray(out)

        return run

    secs = {T: seconds_per_call(call(T), args.repeats) for T in lengths}
    T0 = lengths[0]
    print(
        f"\nB{args.batch}, prompt {args.prompt}, temperature {args.temperature}, scan_layers={cfg.scan}, "
        f"{jax.default_backend()}; median of {args.repeats}\n"
    )
    print("| new tokens T | s/call | tokens/s | ms/step (prefill out) |")
    print("|---|---|---|---|")
    for T in lengths:
        step = "" if T == T0 else f"{1e3 * (secs[T] - secs[T0]) / (T - T0):.2f}"
        print(f"| {T} | {secs[T]:.3f} | {args.batch * T / secs[T]:,.0f} | {step} |")


if __name__ == "__main__":
    main()
