"""Will it fit? Compile a config's train step ahead of time for N devices and print the plan.

    python scripts/plan.py --config configs/llama_1b.py --devices 8 --device_memory_gb 80
    python scripts/plan.py --config configs/gpt2_124m.py --devices 1 --device_memory_gb 80 --mfu 0.45

Runs on CPU with N simulated devices (nothing is allocated: params, optimizer state and batch are abstract
arrays in their sharded layouts) and prints parameters and memory per device, the compiler's peak memory,
FLOPs per step and the step time expected at ``--mfu`` of ``--peak_tflops`` (default: H100 dense bf16).
Fused attention is planned with its real footprint (see ``gptjax.research.plan``). RL configs (ppo, grpo,
rloo) also plan the rollout: generation in its rollout layout and the experience pass
(``gptjax.research.plan.plan_rollout``). Exits 1 naming the biggest consumers when a plan does not fit. Config
overrides work as in scripts/train.py; --verbose: library logs and the traceback (gptjax/train/console.py).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from gptjax.train import console  # imports neither JAX nor TensorFlow

config_flags.DEFINE_config_file("config", None, "Python config file (with :arg).", lock_config=True)
flags.DEFINE_integer("devices", 8, "Devices to plan for (simulated on CPU).")
flags.DEFINE_float("device_memory_gb", 80.0, "Memory per device, GiB.")
flags.DEFINE_float("mfu", 0.4, "Model FLOP utilisation assumed for the step time.")
flags.DEFINE_float("peak_tflops", 989.0, "Peak dense TFLOP/s per device (H100 bf16: 989; TPU v5p: 459).")
flags.DEFINE_float(
    "hbm_tbps", 3.35, "Memory bandwidth per device, TB/s, for PPO's decode time (H100 SXM: 3.35)."
)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup_logging()
    f = flags.FLAGS
    # Before the backend starts: N CPU devices stand in for the accelerators.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={f.devices}"
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    from gptjax.research import plan as plan_lib

    if jax.device_count() != f.devices:
        raise app.UsageError(
            f"--devices={f.devices} but JAX started with {jax.device_count()} devices: run plan.py in a "
            "fresh process (nothing may initialise JAX before it)"
        )
    config = f.config
    kw = dict(mfu=f.mfu, peak_flops_per_device=f.peak_tflops * 1e12)
    plans = {config.stage: plan_lib.plan(config, f.device_memory_gb, **kw)}
    if config.stage in plan_lib.RL_STAGES:  # the rollout's generation and experience pass, beside the state
        plans.update(
            plan_lib.plan_rollout(config, f.device_memory_gb, hbm_bytes_per_second=f.hbm_tbps * 1e12, **kw)
        )
    name = os.path.basename(config_flags.get_config_filename(f["config"]))
    print(plan_lib.table(plans if len(plans) > 1 else plans[config.stage], f"{name} ({config.stage})"))
    if len(plans) > 1:
        r = config.rollout
        print(
            f"\n{config.stage}: one update step (a minibatch); generate: the whole rollout "
            f"({r.batch_size} responses to {r.batch_size // r.samples_per_prompt} prompts, "
            f"{r.generate_rows or r.batch_size} rows per call, {r.max_new_tokens} new tokens), timed as the "
            "prefill at --mfu plus one read of the device's weights and KV cache per token at "
            f"{f.hbm_tbps} TB/s; "
            "score: the experience pass over the rollout. bf16 activations and caches are counted as the "
            "CPU compiler holds them (some in fp32): an upper bound."
        )
    failed = {k: p for k, p in plans.items() if not p.fits}
    for what, p in failed.items():
        lines = [f"  {b / plan_lib.GiB:8.2f} GiB  {item}" for item, b in p.biggest]
        print(
            f"\nDOES NOT FIT ({what}): peak {p.peak_bytes_per_device / plan_lib.GiB:.1f} GiB > "
            f"{f.device_memory_gb:.0f} GiB per device. Params + optimizer + EMA take "
            f"{p.state_bytes_per_device / plan_lib.GiB:.1f} GiB, activations and temporaries "
            f"{p.temp_bytes_per_device / plan_lib.GiB:.1f} GiB; the largest temporaries:\n"
            + "\n".join(lines)
            + (
                "\nTry rollout.generate_rows (prompts per generate call), a rollout.mesh with more tensor "
                "parallelism, or a shorter rollout.max_new_tokens."
                if what == "generate"
                else "\nTry more devices (FSDP), train.micro_batches, model.remat, or a shorter "
                "train.seq_len."
            ),
            file=sys.stderr,
        )
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    console.main(main)
