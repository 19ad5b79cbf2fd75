"""Run the stages on the built-in tiny task and write a report (numbers + plots) to the workdir.

    python scripts/pipeline.py --workdir runs/demo            # what `make demo` runs: pretrain -> SFT -> RM
    python scripts/pipeline.py --workdir runs/q --quick       # a smaller, faster run (smoke test)
    python scripts/pipeline.py --stages pretrain,sft,rm,dpo   # DPO from the SFT model too

Each stage starts from the checkpoint its recipe names (SFT from pretrain; RM and DPO from SFT) and is
resumable: a finished stage is not trained again, and rerunning on a finished workdir rebuilds the report.
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags, logging
from ml_collections import FrozenConfigDict

from gptjax import checkpoint, defaults, evaluate, report, reward, step, train
from gptjax.data import get_vocabulary, tiny

STAGES = ("pretrain", "sft", "rm", "dpo")
INIT_FROM = {"pretrain": "", "sft": "pretrain", "rm": "sft", "dpo": "sft"}

flags.DEFINE_string("workdir", "runs/demo", "Where each stage's run and the report go.")
flags.DEFINE_string("config", "configs/tiny.py", "Config file; its arg selects the stage.")
flags.DEFINE_list("stages", ["pretrain", "sft", "rm"], f"Stages to run, in order, from {list(STAGES)}.")
flags.DEFINE_bool("quick", False, "Fewer steps and a smaller eval, for a smoke run.")
flags.DEFINE_integer("eval_prompts", 150, "Held-out prompts for the gold-reward evaluation.")
flags.DEFINE_integer("steps", 0, "Steps per stage (0: the config's, or a tenth of it with --quick).")
FLAGS = flags.FLAGS


def stage_config(stage: str):
    c = defaults.load_config(f"{FLAGS.config}:stage={stage}")
    if INIT_FROM[stage]:
        c.train.init_from = os.path.join(FLAGS.workdir, INIT_FROM[stage])
    if FLAGS.quick:
        c.train.steps = max(c.train.steps // 10, 10)
        c.train.checkpoint_every = c.train.steps
        if c.train.eval_every:
            c.train.eval_every = c.train.steps
    if FLAGS.steps:
        c.train.steps = c.train.checkpoint_every = FLAGS.steps
        c.train.eval_every = FLAGS.steps if c.train.eval_every else 0
    return c


def demo_reward(n: int = 500) -> float:
    """Mean gold reward of the SFT demonstrations themselves (they are noisy on purpose)."""
    recs = tiny.sft_records(0, n)
    return sum(tiny.gold_reward(r["prompt"], r["response"]) for r in recs) / len(recs)


def finished(workdir: str, steps: int) -> bool:
    try:
        return checkpoint.load_meta(workdir)[0] >= steps
    except FileNotFoundError:
        return False


def evaluate_stage(stage: str, config, workdir: str, vocab) -> dict:
    """The stage's numbers for the report: gold reward of greedy samples (LM stages), or the reward model's
    held-out accuracy, gold agreement and the demonstrations' mean reward (RM)."""
    cfg, params = checkpoint.load_model(workdir)
    out = {"final_train_loss": report.last_row(workdir).get("loss")}
    if stage == "rm":
        ctx = step.Ctx(model_cfg=cfg, loss_cfg=FrozenConfigDict(config.loss))
        n = 40 if FLAGS.quick else 300
        held_out = [
            (r["prompt"], r["responses"]) for r in tiny.records("rank", "validation", config.data.tiny)
        ]
        out.update(
            reward.evaluate_rm(ctx, params, vocab, held_out[:n], config.train.seq_len, tiny.gold_reward)
        )
        demos = reward.demonstrations(config.normalize.data, vocab, 256)
        scores = reward.score(ctx, params, vocab, demos, config.train.seq_len)
        out["demo_reward_mean"] = float(sum(float(s[0]) for s in scores) / len(scores))
        return out
    if stage == "pretrain":  # a pretrained model only continues text (it never answers): loss alone
        return out
    prompts = tiny.eval_prompts(n=FLAGS.eval_prompts if not FLAGS.quick else 40)
    out.update(
        evaluate.gold_reward_eval(cfg, params, vocab, prompts, tiny.gold_reward, rng=jax.random.key(0))
    )
    if stage == "dpo":
        out["eval_margin"] = report.last_row(workdir, "eval").get("margin")
    return out


def main(argv):
    del argv
    train.setup_logging()
    os.makedirs(FLAGS.workdir, exist_ok=True)
    unknown = [s for s in FLAGS.stages if s not in STAGES]
    if unknown:
        raise app.UsageError(f"--stages: unknown {unknown}; known: {list(STAGES)}")
    results = {}
    for stage in FLAGS.stages:
        workdir = os.path.join(FLAGS.workdir, stage)
        config = stage_config(stage)
        saved = os.path.join(workdir, "results.json")
        if finished(workdir, config.train.steps) and os.path.exists(saved):
            logging.info("=== stage %s: finished in %s, not trained again", stage, workdir)
            with open(saved) as f:
                results[stage] = json.load(f)
            continue
        logging.info("=== stage %s -> %s", stage, workdir)
        train.run(config, workdir)
        results[stage] = evaluate_stage(stage, config, workdir, get_vocabulary(config.data))
        with open(saved, "w") as f:
            json.dump(results[stage], f, indent=1)
    write_report(results)


def write_report(results: dict) -> None:
    workdir = FLAGS.workdir
    report.plot_curves({s: os.path.join(workdir, s) for s in results}, os.path.join(workdir, "loss.png"))
    lm = {s: r for s, r in results.items() if s != "rm"}
    lines = [
        "# gptjax demo: the tiny task",
        "",
        "Gold reward (hidden programmatic score in [0, 1]) of greedy samples on held-out prompts.",
        "",
        *report.table(
            ["stage", "final train loss", "gold reward", "EOS rate", "mean length"],
            [
                [
                    s,
                    report.fmt(r["final_train_loss"]),
                    report.fmt(r.get("gold_reward")),
                    report.fmt(r.get("eos_rate"), ".2f"),
                    report.fmt(r.get("mean_length"), ".1f"),
                ]
                for s, r in lm.items()
            ],
        ),
        "",
        f"SFT demonstrations' own gold reward: {demo_reward():.3f} (the ideal response scores 1.0).",
        "",
    ]
    if "rm" in results:
        r = results["rm"]
        lines += [
            "## Reward model",
            "",
            *report.table(
                [
                    "held-out pairwise accuracy",
                    "gold agreement",
                    "reward mean",
                    "reward std",
                    "demonstrations' mean reward (normalised)",
                    "pairs",
                ],
                [
                    [
                        report.fmt(r["pairwise_accuracy"]),
                        report.fmt(r.get("gold_agreement")),
                        report.fmt(r["reward_mean"]),
                        report.fmt(r["reward_std"]),
                        report.fmt(r["demo_reward_mean"]),
                        report.fmt(r["pairs"], ".0f"),
                    ]
                ],
            ),
            "",
            "Pairwise accuracy: held-out pairs the RM orders like the simulated labelers (chance 0.5).",
            "Gold agreement: pairs (gold reward not tied) the RM orders like the hidden gold reward.",
            "",
        ]
    if "dpo" in results:
        lines += [
            f"DPO: held-out chosen-minus-rejected margin {report.fmt(results['dpo'].get('eval_margin'))}.",
            "",
        ]
    lines += ["![losses](loss.png)", ""]
    for stage, r in lm.items():
        if "samples" not in r:
            continue
        lines += [f"## Samples after {stage}", ""]
        lines += report.table(
            ["prompt", "response", "gold"],
            [[f"`{s['prompt']}`", f"`{s['response']!r}`", f"{s['gold_reward']:.2f}"] for s in r["samples"]],
        )
        lines.append("")
    path = os.path.join(workdir, "report.md")
    report.write(path, lines, results)
    print("\n".join(lines[: lines.index("![losses](loss.png)")]))
    print(f"report: {path}")


if __name__ == "__main__":
    app.run(main)
