"""Run every stage on the built-in tiny task and write a report (numbers + plots) to the workdir.

    python scripts/pipeline.py --workdir runs/demo            # what `make demo` runs
    python scripts/pipeline.py --workdir runs/q --quick       # a smaller, faster run (smoke test)

Each stage starts from the previous stage's checkpoint and is resumable: rerunning skips finished stages.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags, logging

from gptjax import checkpoint, defaults, evaluate, train
from gptjax.data import get_vocabulary, tiny

STAGES = ("pretrain", "sft")

flags.DEFINE_string("workdir", "runs/demo", "Where each stage's run and the report go.")
flags.DEFINE_string("config", "configs/tiny.py", "Config file; its arg selects the stage.")
flags.DEFINE_list("stages", list(STAGES), "Stages to run, in order.")
flags.DEFINE_bool("quick", False, "Fewer steps and a smaller eval, for a smoke run.")
flags.DEFINE_integer("eval_prompts", 200, "Held-out prompts for the gold-reward evaluation.")
FLAGS = flags.FLAGS


def stage_config(stage: str, init_from: str):
    c = defaults.load_config(f"{FLAGS.config}:stage={stage}")
    c.train.init_from = init_from
    if FLAGS.quick:
        c.train.steps = max(c.train.steps // 10, 10)
        c.train.checkpoint_every = c.train.steps
    return c


def demo_reward(n: int = 500) -> float:
    """Mean gold reward of the SFT demonstrations themselves (they are noisy on purpose)."""
    recs = tiny.sft_records(0, n)
    return sum(tiny.gold_reward(r["prompt"], r["response"]) for r in recs) / len(recs)


def plot_losses(workdir: str, stages: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.5), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        with open(os.path.join(workdir, stage, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        for split in ("train", "eval"):
            pts = [(r["step"], r["loss"]) for r in rows if r["split"] == split and "loss" in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=split, marker="o" if split == "eval" else None)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv):
    del argv
    train.setup_logging()
    os.makedirs(FLAGS.workdir, exist_ok=True)
    unknown = [s for s in FLAGS.stages if s not in STAGES]
    if unknown:
        raise app.UsageError(f"--stages: unknown {unknown}; known: {list(STAGES)}")
    results, previous = {}, ""
    vocab = None
    prompts = tiny.eval_prompts(n=FLAGS.eval_prompts if not FLAGS.quick else 40)
    for stage in FLAGS.stages:
        workdir = os.path.join(FLAGS.workdir, stage)
        config = stage_config(stage, previous)
        vocab = vocab or get_vocabulary(config.data)
        logging.info("=== stage %s -> %s", stage, workdir)
        last = train.run(config, workdir)
        cfg, params = checkpoint.load_model(workdir)
        ev = evaluate.gold_reward_eval(cfg, params, vocab, prompts, tiny.gold_reward, rng=jax.random.key(0))
        results[stage] = {"final_train_loss": last.get("loss"), **ev}
        logging.info("stage %s: gold reward %.3f, EOS rate %.2f", stage, ev["gold_reward"], ev["eos_rate"])
        previous = workdir
    write_report(results)


def write_report(results: dict) -> None:
    plot_losses(FLAGS.workdir, list(results), os.path.join(FLAGS.workdir, "loss.png"))
    lines = [
        "# gptjax demo: the tiny task",
        "",
        "Gold reward (hidden programmatic score in [0, 1]) of greedy samples on held-out prompts.",
        "",
        "| stage | final train loss | gold reward | EOS rate | mean length |",
        "|---|---|---|---|---|",
    ]
    for stage, r in results.items():
        lines.append(
            f"| {stage} | {r['final_train_loss']:.3f} | {r['gold_reward']:.3f} | {r['eos_rate']:.2f} | "
            f"{r['mean_length']:.1f} |"
        )
    lines += [
        "",
        f"SFT demonstrations' own gold reward: {demo_reward():.3f} (the ideal response scores 1.0).",
        "",
        "![losses](loss.png)",
        "",
    ]
    for stage, r in results.items():
        lines += [f"## Samples after {stage}", "", "| prompt | response | gold |", "|---|---|---|"]
        lines += [f"| `{s['prompt']}` | `{s['response']!r}` | {s['gold_reward']:.2f} |" for s in r["samples"]]
        lines.append("")
    with open(os.path.join(FLAGS.workdir, "report.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(FLAGS.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n".join(lines[: 6 + len(results) + 2]))
    print(f"report: {os.path.join(FLAGS.workdir, 'report.md')}")


if __name__ == "__main__":
    app.run(main)
