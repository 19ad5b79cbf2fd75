"""A LoRA policy's generation, adapters applied vs merged into a copy, on a plain / int8 / int4 / nf4 base.

    python scripts/bench_lora_generation.py                      # a 25M-parameter model on this host
    python scripts/bench_lora_generation.py --d_model 1024 --n_layers 8 --rows 8 --new_tokens 64

Each variant generates ``--rows`` responses of ``--new_tokens`` tokens from the same prompts (sampling at
T=1 with one key, so every variant draws the same tokens where its logits agree); 'merged' includes the
merge (``lora.merge``: once a rollout). Reported: compile seconds, the median of ``--repeats`` timed calls,
tokens per second, the ratio to 'merged' on the same base, the bytes of the weights generation reads, and
whether the tokens equal the 'adapters' run's on the same base. Variants run interleaved, ``--rounds`` times,
so a noisy host shows in the spread between rounds rather than in one variant's favour.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import model
from gptjax.interop import lora
from gptjax.model import quant, sample
from gptjax.rl import policy as policy_lib


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--n_layers", type=int, default=6)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--bases", default="none,int8,int4,nf4")
    args = p.parse_args(argv)

    cfg = model.ModelConfig.llama(
        vocab_size=512,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=max(args.d_model // 64, 1),
        n_kv_heads=max(args.d_model // 128, 1),
        max_len=args.prompt_len + args.new_tokens,
        lora_rank=args.rank,
        lora_targets=model.LORA_TARGETS,
    )
    params = model.init(cfg, jax.random.key(0))
    adapters, base = lora.split(params)
    # trained-looking adapters: B away from its zero init
    adapters = jax.tree.map(
        lambda x: x + 0.02 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), adapters
    )
    prompts_BP = jax.random.randint(jax.random.key(2), (args.rows, args.prompt_len), 3, 500, jnp.int32)
    rng = jax.random.key(3)

    variants = {}
    for b in args.bases.split(","):
        held = base if b == "none" else quant.quantize_base(cfg, base, b)
        held_cfg = cfg.replace(lora_base_quant="" if b == "none" else b)
        for mode in policy_lib.GENERATION_MODES:
            variants[(b, mode)] = (held_cfg, lora.combine(adapters, held), mode)

    def once(held_cfg, full, mode):
        gparams = policy_lib.generation_params(held_cfg, full, mode)
        out = sample.generate(
            policy_lib.generation_config(held_cfg, mode),
            gparams,
            prompts_BP,
            rng,
            max_new_tokens=args.new_tokens,
        )
        return jax.block_until_ready(out), gparams

    compile_s, times, tokens, weights = {}, {k: [] for k in variants}, {}, {}
    for key, v in variants.items():
        start = time.perf_counter()
        out, gparams = once(*v)
        compile_s[key] = time.perf_counter() - start
        tokens[key] = np.asarray(out)
        weights[key] = quant.quant_bytes(gparams)
    for _ in range(args.rounds):
        for key, v in variants.items():
            for _ in range(args.repeats):
                start = time.perf_counter()
                once(*v)
                times[key].append(time.perf_counter() - start)

    n_tokens = args.rows * args.new_tokens
    print(
        f"{model.num_params(cfg.replace(lora_rank=0)) / 1e6:.1f}M-parameter llama, LoRA rank {args.rank} on "
        f"every projection, {args.rows} rows x {args.new_tokens} new tokens, {jax.devices()[0].platform}"
    )
    print(
        "| base | generation | compile s | median s | tokens/s | speed vs merged | spread | weights MB "
        "| same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for (b, mode), ts in times.items():
        reference = tokens[(b, "adapters")]  # merged weights sample what the adapters on the same base do
        med = statistics.median(ts)
        merged = statistics.median(times[(b, "merged")])
        spread = (max(ts) - min(ts)) / med
        same = "yes" if np.array_equal(tokens[(b, mode)], reference) else "no"
        print(
            f"| {b} | {mode} | {compile_s[(b, mode)]:.1f} | {med:.3f} | {n_tokens / med:.0f} | "
            f"{merged / med:.2f}x | {spread:.0%} | {weights[(b, mode)] / 2**20:.1f} | {same} |"
        )


if __name__ == "__main__":
    main()
