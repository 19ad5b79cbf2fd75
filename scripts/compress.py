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
A multi-role workdir needs ``--role``; LoRA adapters are merged into their base first. --verbose: library logs
and the traceback (gptjax/train/console.py).
"""

from __future__ import annotations

from absl import app, flags

from gptjax.research import compress
from gptjax.train import console

flags.DEFINE_string("checkpoint", None, "The workdir to compress.")
flags.DEFINE_string("out", None, "The new workdir.")
flags.DEFINE_enum("method", None, compress.METHODS, "How to compress.")
flags.DEFINE_float("sparsity", 0.5, "Pruning: share of each matrix set to 0.")
flags.DEFINE_string("pattern", None, "Pruning: N:M instead of --sparsity, e.g. 2:4.")
flags.DEFINE_enum("scope", "matrix", ("matrix", "global"), "Magnitude: where the threshold is taken.")
flags.DEFINE_integer("group_size", 64, "int4: inputs per scale.")
flags.DEFINE_bool("zero_point", False, "int4: asymmetric groups (a zero point each).")
flags.DEFINE_bool("embeddings", False, "Also the token embedding / LM head.")
flags.DEFINE_integer("calibration", 128, "sparsegpt: calibration sequences.")
flags.DEFINE_integer("block_size", 128, "sparsegpt: inputs per mask block.")
flags.DEFINE_float("damp", 0.01, "sparsegpt: Hessian damping (x mean diagonal).")
flags.DEFINE_string("role", None, "The role of a multi-role workdir (PPO's 'policy').")
flags.DEFINE_bool("ema", False, "Its EMA weights.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_integer("seed", 0, "sparsegpt: calibration data order.")
flags.register_validator("sparsity", lambda s: 0.0 <= s < 1.0, "must be in [0, 1)")
flags.mark_flags_as_required(["checkpoint", "out", "method"])
FLAGS = flags.FLAGS


def main(argv) -> dict:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup_logging()
    record = compress.compress_workdir(
        FLAGS.checkpoint,
        FLAGS.out,
        FLAGS.method,
        role=FLAGS.role,
        ema=FLAGS.ema,
        step=FLAGS.step,
        calibration=FLAGS.calibration,
        seed=FLAGS.seed,
        sparsity=FLAGS.sparsity,
        pattern=FLAGS.pattern,
        scope=FLAGS.scope,
        group_size=FLAGS.group_size,
        symmetric=not FLAGS.zero_point,
        embeddings=FLAGS.embeddings,
        block_size=FLAGS.block_size,
        damp=FLAGS.damp,
    )
    print(
        f"{FLAGS.checkpoint} -> {FLAGS.out}: {FLAGS.method}, sparsity {record['sparsity']:.3f}, "
        f"{record['bytes_compressed'] / 2**20:.2f} MiB compressed vs {record['bytes_fp32'] / 2**20:.2f} MiB "
        f"fp32 ({record['ratio_to_fp32']:.3f}), {record['seconds']:.1f} s"
    )
    return record


if __name__ == "__main__":
    console.main(main)
