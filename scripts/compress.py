"""Compress a finished model: weight-only int8 / int4, magnitude pruning or SparseGPT, one command.

    python scripts/compress.py --checkpoint runs/tiny/sft --method int8 --out runs/tiny/sft_int8
    python scripts/compress.py --checkpoint runs/tiny/sft --method int4 --group_size 64 --out runs/tiny/sft_q4
    python scripts/compress.py --checkpoint runs/tiny/sft --method magnitude --sparsity 0.5 --out runs/tiny/m5
    python scripts/compress.py --checkpoint runs/tiny/sft --method sparsegpt --pattern 2:4 --calibration 128 \
        --out runs/tiny/sft_sgpt24
    python scripts/compress.py --checkpoint runs/ppo --role policy --ema --method int8 --out runs/ppo_int8

The output is a normal gptjax workdir holding the compressed model's weights DEQUANTISED (int8 / int4) or
pruned (zeros in place) in the model's own dtype, so chat, generate, the evaluators, ``init_from`` and HF
export (scripts/convert_hf.py --to-hf) read it unchanged, at the original model's speed and memory. Beside
the checkpoint: ``compression.json`` (method, bits, group size, requested and achieved sparsity per
matrix, bytes of the compressed form against fp32) and, for int8 / int4, ``quantized.npz``, the packed
arrays themselves (int8 codes + per-channel scales; two 4-bit codes a byte + fp16 group scales), which
``gptjax.research.compress.load_quantized`` reads and ``gptjax.model.quant.dequantize`` turns back into
exactly the checkpoint's weights. Which weights: the blocks' matmul weights (``gptjax.model.quant``);
``--embeddings`` adds the token embedding / LM head (not for SparseGPT).

SparseGPT calibrates on ``--calibration`` packed sequences of the run's pretraining text, training split (its
PPO-ptx text, its own data for a pretraining run, else the tiny task's text), at the run's sequence length.
A multi-role workdir needs ``--role``; LoRA adapters are merged into their base first.
"""

from __future__ import annotations

import argparse
import sys

from gptjax.research import compress


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the workdir to compress")
    p.add_argument("--out", required=True, help="the new workdir")
    p.add_argument("--method", required=True, choices=compress.METHODS)
    p.add_argument("--sparsity", type=float, default=0.5, help="pruning: share of each matrix set to 0")
    p.add_argument("--pattern", default=None, help="pruning: N:M instead of --sparsity, e.g. 2:4")
    p.add_argument("--scope", default="matrix", choices=("matrix", "global"), help="magnitude: threshold")
    p.add_argument("--group_size", type=int, default=64, help="int4: inputs per scale")
    p.add_argument("--zero_point", action="store_true", help="int4: asymmetric groups (a zero point each)")
    p.add_argument("--embeddings", action="store_true", help="also the token embedding / LM head")
    p.add_argument("--calibration", type=int, default=128, help="sparsegpt: calibration sequences")
    p.add_argument("--block_size", type=int, default=128, help="sparsegpt: inputs per mask block")
    p.add_argument("--damp", type=float, default=0.01, help="sparsegpt: Hessian damping (x mean diagonal)")
    p.add_argument("--role", default=None, help="the role of a multi-role workdir (PPO's 'policy')")
    p.add_argument("--ema", action="store_true", help="its EMA weights")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--seed", type=int, default=0, help="sparsegpt: calibration data order")
    args = p.parse_args(argv)
    if not 0.0 <= args.sparsity < 1.0:
        p.error(f"--sparsity {args.sparsity} must be in [0, 1)")
    record = compress.compress_workdir(
        args.checkpoint,
        args.out,
        args.method,
        role=args.role,
        ema=args.ema,
        step=args.step,
        calibration=args.calibration,
        seed=args.seed,
        sparsity=args.sparsity,
        pattern=args.pattern,
        scope=args.scope,
        group_size=args.group_size,
        symmetric=not args.zero_point,
        embeddings=args.embeddings,
        block_size=args.block_size,
        damp=args.damp,
    )
    print(
        f"{args.checkpoint} -> {args.out}: {args.method}, sparsity {record['sparsity']:.3f}, "
        f"{record['bytes_compressed'] / 2**20:.2f} MiB compressed vs {record['bytes_fp32'] / 2**20:.2f} MiB "
        f"fp32 ({record['ratio_to_fp32']:.3f}), {record['seconds']:.1f} s"
    )
    return record


if __name__ == "__main__":
    main(sys.argv[1:])
