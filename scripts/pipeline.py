"""Run the stages on the built-in tiny task and write a report (numbers + plots) to the workdir.

    python scripts/pipeline.py --workdir runs/demo            # `make demo`: pretrain -> SFT -> RM -> PPO
    python scripts/pipeline.py --workdir runs/q --quick       # a smaller, faster run (smoke test)
    python scripts/pipeline.py --stages pretrain,sft,rm,dpo   # DPO from the SFT model instead of PPO
    python scripts/pipeline.py --recipe rlvr --workdir runs/rlvr   # `make rlvr`: verifiable rewards, GRPO

Each stage starts from the checkpoints its recipe names (SFT from pretrain; RM and DPO from SFT; PPO's policy
and frozen reference from SFT, its critic and frozen reward model from the RM) and is resumable: a finished
stage is not trained again, and rerunning on a finished workdir rebuilds the report. A stage whose recorded
start (config, data, the upstream stages' checkpoint steps) differs from this run's is neither reused nor
resumed: the pipeline stops naming each difference (e.g. ``--steps 4`` after ``--steps 3``: SFT was started
from pretrain@3, which is now pretrain@4); use a new ``--workdir``.

The policies (SFT, DPO, PPO and PPO's EMA) are compared on held-out prompts by the hidden gold reward of
``--eval_samples`` samples per prompt at temperature 1 (the distribution PPO optimises; mean and standard
error over prompts, paired by prompt for differences), the reward model's score and the KL to the SFT model;
greedy answers are scored too.
"""

from __future__ import annotations

import os
import time

from absl import app, flags, logging

from gptjax import checkpoint, evals, train
from gptjax.data import get_vocabulary, tiny
from gptjax.evals import evaluate
from gptjax.research import iterate, report, rlvr
from gptjax.train import defaults, provenance

STAGES = ("pretrain", "sft", "rm", "ppo", "dpo")
INIT_FROM = {"pretrain": "", "sft": "pretrain", "rm": "sft", "dpo": "sft", "ppo": ""}
finished = iterate.finished

flags.DEFINE_enum(
    "recipe",
    "demo",
    ["demo", "rlvr"],
    "demo: the tiny task's InstructGPT recipe (pretrain -> SFT -> RM -> PPO / DPO); rlvr: RL with verifiable "
    "rewards on the arithmetic task (pretrain -> SFT -> --methods on the checker; gptjax.research.rlvr).",
)
flags.DEFINE_list("methods", ["grpo"], f"rlvr: the RL objectives to train, from {list(rlvr.METHODS)}.")
flags.DEFINE_list("seeds", ["0"], "rlvr: seeds of each method's RL run (pretraining and SFT run once).")
flags.DEFINE_string("workdir", "runs/demo", "Where each stage's run and the report go.")
flags.DEFINE_string("config", "configs/tiny.py", "Config file; its arg selects the stage.")
flags.DEFINE_list(
    "stages", ["pretrain", "sft", "rm", "ppo"], f"Stages to run, in order, from {list(STAGES)}."
)
flags.DEFINE_bool("quick", False, "Fewer steps and a smaller eval, for a smoke run.")
flags.DEFINE_integer("eval_prompts", 200, "Held-out prompts for the gold-reward evaluation.")
flags.DEFINE_integer("eval_samples", 4, "Sampled responses per held-out prompt.")
flags.DEFINE_integer("steps", 0, "Steps per stage (0: the config's, or a tenth of it with --quick).")
flags.DEFINE_integer(
    "rounds",
    0,
    "Iterated RLHF after the stages (which must include ppo): R rounds of collecting comparisons of the "
    "current policy's samples from the simulated labelers, retraining the RM on every comparison so far, and "
    "PPO from the current policy against it.",
)
flags.DEFINE_integer("round_prompts", 500, "Iterated RLHF: prompts labelled per round (4 samples each).")
FLAGS = flags.FLAGS


def stage_config(stage: str):
    arg = f"stage={stage}"
    if stage == "ppo":
        arg += f",sft={os.path.join(FLAGS.workdir, 'sft')},rm={os.path.join(FLAGS.workdir, 'rm')}"
    c = defaults.load_config(f"{FLAGS.config}:{arg}")
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


def eval_prompts() -> int:
    return 40 if FLAGS.quick else FLAGS.eval_prompts


def compare(stage: str, workdir: str, vocab) -> dict:
    return iterate.compare(
        FLAGS.workdir, stage, workdir, vocab, prompts=eval_prompts(), samples=FLAGS.eval_samples
    )


def greedy_vs_sft(policy_per_prompt: list, sft_per_prompt: list) -> dict[str, float]:
    """A policy's greedy gold reward minus SFT's, paired by prompt: mean, standard error, z."""
    diff, se = evaluate.paired_difference({"per_prompt": policy_per_prompt}, {"per_prompt": sft_per_prompt})
    return {"greedy_vs_sft": diff, "greedy_vs_sft_se": se, "greedy_vs_sft_z": diff / max(se, 1e-12)}


def evaluate_stage(stage: str, config, workdir: str, vocab) -> dict:
    """The stage's numbers for the report, from the evaluators: gold reward of greedy and sampled answers
    (LM stages), or the reward model's held-out accuracy, gold agreement and the demonstrations' mean reward
    (RM)."""
    out = {"final_train_loss": report.last_row(workdir).get("loss")}
    if stage == "rm":
        out.update(iterate.rm_numbers(config, workdir, vocab, 40 if FLAGS.quick else 200))
        return out
    if stage == "pretrain":  # a pretrained model only continues text (it never answers): loss alone
        return out
    if stage == "ppo":
        out["final_train_loss"] = report.last_row(workdir).get("policy_loss")
        out["rollouts"] = report.last_row(workdir, "rollout")
    policy = checkpoint.load_model(workdir, role=iterate.POLICY_ROLE.get(stage))
    n_greedy = FLAGS.eval_prompts if not FLAGS.quick else 40
    greedy = iterate.greedy(policy, vocab, n_greedy)
    greedy_per_prompt = greedy.pop("greedy_per_prompt")
    out.update(greedy)
    if stage == "sft":  # sampled answers: compared with each later policy on the same prompts and keys
        return out
    sampled = compare(stage, workdir, vocab)
    out.update({k: v for k, v in sampled.pop(stage).items() if k != "per_prompt"})
    out["compared"] = {name: {k: v for k, v in r.items() if k != "per_prompt"} for name, r in sampled.items()}
    if stage == "ppo":  # greedy answers paired by prompt with SFT's: a greedy mean alone hides its error
        sft = iterate.greedy(checkpoint.load_model(os.path.join(FLAGS.workdir, "sft")), vocab, n_greedy)
        out.update(greedy_vs_sft(greedy_per_prompt, sft["greedy_per_prompt"]))
        ema = iterate.greedy(checkpoint.load_model(workdir, role="policy", ema=True), vocab, n_greedy)
        out["compared"]["ppo_ema"]["greedy_gold_reward"] = ema["greedy_gold_reward"]
        out["compared"]["ppo_ema"].update(greedy_vs_sft(ema["greedy_per_prompt"], sft["greedy_per_prompt"]))
    if stage == "dpo":
        out["eval_margin"] = report.last_row(workdir, "eval").get("margin")
    return out


def main(argv):
    del argv
    train.setup_logging()
    if FLAGS.recipe == "rlvr":
        steps = {"grpo": FLAGS.steps} if FLAGS.steps else {}
        if FLAGS.quick:
            steps = {stage: 10 for stage in ("pretrain", "sft", *FLAGS.methods)}
        rlvr.run(
            FLAGS.workdir,
            methods=FLAGS.methods,
            seeds=[int(s) for s in FLAGS.seeds],
            steps=steps,
            prompts=eval_prompts(),
            samples=FLAGS.eval_samples,
        )
        return
    os.makedirs(FLAGS.workdir, exist_ok=True)
    unknown = [s for s in FLAGS.stages if s not in STAGES]
    if unknown:
        raise app.UsageError(f"--stages: unknown {unknown}; known: {list(STAGES)}")
    results = {}
    for stage in FLAGS.stages:
        workdir = os.path.join(FLAGS.workdir, stage)
        config = stage_config(stage)
        saved = evals.read_results(workdir)  # the loop's evaluators write there too: ours is a key of it
        try:
            if finished(workdir, config.train.steps) and "final_train_loss" in saved:
                # only if it was trained from the upstream stages' checkpoints as they are now
                provenance.check_workdir(config, workdir)
                logging.info("=== stage %s: finished in %s, not trained again", stage, workdir)
                results[stage] = saved
                continue
            logging.info("=== stage %s -> %s", stage, workdir)
            start = time.perf_counter()
            train.run(config, workdir)
        except provenance.ResumeMismatch as e:
            raise SystemExit(
                f"pipeline: stage {stage} cannot reuse {workdir}: {e}\nWith the pipeline: rerun with a new "
                f"--workdir, or move {workdir} and the stages after it aside to retrain them"
            ) from None
        trained = time.perf_counter()
        results[stage] = evaluate_stage(stage, config, workdir, get_vocabulary(config.data))
        results[stage].update(train_s=trained - start, eval_s=time.perf_counter() - trained)
        results[stage] = evals.merge_results(workdir, results[stage])
    if FLAGS.rounds:
        if "ppo" not in results:
            raise app.UsageError("--rounds needs the ppo stage (the first round's policy)")
        results["rounds"] = rounds(results)
    write_report(results)


def rounds(results: dict) -> list[dict]:
    """Iterated RLHF (``--rounds``, ``gptjax.research.iterate``): finished rounds are not rerun."""
    return iterate.rounds(
        FLAGS.workdir,
        FLAGS.config,
        FLAGS.rounds,
        first=results["ppo"],
        rm_first=results.get("rm"),
        rm_config=stage_config("rm"),
        prompts_per_round=FLAGS.round_prompts,
        eval_prompts=eval_prompts(),
        eval_samples=FLAGS.eval_samples,
        rm_examples=40 if FLAGS.quick else 200,
    )


def policy_rows(results: dict) -> dict[str, dict]:
    """The LM policies to compare: each LM stage, plus PPO's EMA (evaluated with the PPO stage)."""
    rows = {s: r for s, r in results.items() if s not in ("rm", "pretrain", "rounds")}
    for stage in ("dpo", "ppo"):  # the SFT model's sampled numbers come from a later comparison
        compared = results.get(stage, {}).get("compared", {})
        if "sft" in rows and "sft" in compared:
            rows["sft"] = {**compared["sft"], **rows["sft"]}
    if "ppo_ema" in results.get("ppo", {}).get("compared", {}):
        rows["ppo_ema"] = results["ppo"]["compared"]["ppo_ema"]
    return rows


# Each stage's figure in the report: its loss (an RL stage: policy and value loss) and, for the pairwise
# stages, how often the chosen response wins
STAGE_CURVES = {"rm": ("loss", "accuracy"), "dpo": ("loss", "accuracy")}


def rollout_references(policies: dict, ppo_dir: str) -> dict:
    """The PPO figure's references (``report.plot_rollouts``): the SFT model's held-out numbers as lines,
    the final policy's and its EMA's held-out numbers as points at the last step."""
    sft = policies.get("sft", {})
    baselines = {"kl": ("SFT (the reference)", 0.0)}
    for metric, key in (("gold_reward", "gold_reward_mean"), ("reward", "rm_reward_mean")):
        if sft.get(key) is not None:
            baselines[metric] = ("SFT, held out", sft[key])
    last = report.last_row(ppo_dir).get("step", 0)
    se_of = {"gold_reward_mean": "gold_reward_se", "kl_to_ref": "kl_to_ref_se"}
    marks: dict = {}
    for name, label in (("ppo", "PPO, held out"), ("ppo_ema", "PPO EMA, held out")):
        r = policies.get(name, {})
        for metric, key in report.HELD_OUT.items():
            if r.get(key) is not None:
                se = r.get(se_of[key]) if key in se_of else None
                marks.setdefault(metric, {})[label] = (last, r[key], se)
    return {"baselines": baselines, "marks": marks}


def plot_report(results: dict, policies: dict) -> list[str]:
    """The report's figures in the workdir, as markdown image lines: PPO per rollout (smoothed, with the SFT
    baseline and the final policy and its EMA held out), then one small figure per stage's training."""
    workdir, plots = FLAGS.workdir, []
    runs = {s: os.path.join(workdir, s) for s in results if s in STAGES}
    if "ppo" in runs:
        path = os.path.join(workdir, "ppo.png")
        report.plot_rollouts(runs["ppo"], path, **rollout_references(policies, runs["ppo"]))
        plots += [
            "![PPO per rollout](ppo.png)",
            "",
            "PPO per rollout: each rollout's value faint, its moving average (EMA) bold; dashed: the SFT "
            "model on held-out prompts; points: the final policy and its EMA weights on held-out prompts (+- "
            "standard error). Rollout numbers are on training prompts.",
            "",
        ]
    for stage, run in runs.items():
        if report.plot_stage(run, os.path.join(workdir, f"{stage}_loss.png"), stage, STAGE_CURVES.get(stage)):
            plots.append(f"![{stage} training]({stage}_loss.png)")
    return plots


def write_report(results: dict) -> None:
    workdir = FLAGS.workdir
    policies = policy_rows(results)
    plots = plot_report(results, policies)
    lines = [
        "# gptjax demo: the tiny task",
        "",
        f"Gold reward: the hidden programmatic score in [0, 1] of {FLAGS.eval_samples} sampled answers "
        "(temperature 1) to each held-out prompt, mean +- standard error over prompts; greedy: one greedy "
        "answer per prompt. RM reward: the reward model's (normalised) score. KL: per answer, to the SFT "
        "model.",
        "",
        *report.table(
            ["policy", "gold reward", "greedy gold", "RM reward", "KL to SFT", "EOS rate", "mean length"],
            [
                [
                    s,
                    f"{report.fmt(r.get('gold_reward_mean'))} +- {report.fmt(r.get('gold_reward_se'))}",
                    report.fmt(r.get("greedy_gold_reward")),
                    report.fmt(r.get("rm_reward_mean")),
                    report.fmt(r.get("kl_to_ref")),
                    report.fmt(r.get("eos_rate"), ".2f"),
                    report.fmt(r.get("mean_length"), ".1f"),
                ]
                for s, r in policies.items()
            ],
        ),
        "",
    ]
    for name, r in policies.items():
        if "gold_vs_sft" in r:
            lines.append(
                f"- {name} - SFT gold reward: {r['gold_vs_sft']:+.3f} +- {r['gold_vs_sft_se']:.3f} "
                f"(paired by prompt; {r['gold_vs_sft_z']:.1f} standard errors)"
            )
        if "greedy_vs_sft" in r:
            diff, se, z = (r[f"greedy_vs_sft{k}"] for k in ("", "_se", "_z"))
            lines.append(
                f"- {name} - SFT greedy gold reward: {diff:+.3f} +- {se:.3f} (paired by prompt; {z:.1f} "
                'standard errors; docs/results.md, "PPO\'s greedy answers": why they can fall while the '
                "samples improve, and why the EMA's hold)"
            )
    lines += [
        f"- the SFT demonstrations themselves score {demo_reward():.3f}; the ideal answer 1.0.",
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
    if "rounds" in results:
        lines += [
            "## Iterated RLHF",
            "",
            "Round 0: the PPO stage above. Each round: comparisons of the current policy's samples from the "
            "simulated labelers, an RM retrained from SFT on all comparisons so far, PPO from the current "
            "policy.",
            "",
            *report.table(
                ["round", "gold reward", "gold - SFT (paired)", "KL to SFT", "RM held-out accuracy"],
                [
                    [
                        str(r["round"]),
                        f"{report.fmt(r['gold'])} +- {report.fmt(r['gold_se'])}",
                        report.fmt(r.get("gold_vs_sft")),
                        report.fmt(r.get("kl")),
                        report.fmt(r.get("rm_accuracy")),
                    ]
                    for r in results["rounds"]
                ],
            ),
            "",
        ]
    losses = {s: report.fmt(r.get("final_train_loss")) for s, r in results.items() if s != "rounds"}
    lines += ["Final train loss: " + ", ".join(f"{s} {v}" for s, v in losses.items()) + ".", ""]
    timed = {s: r for s, r in results.items() if isinstance(r, dict) and "train_s" in r}
    if timed:
        total = sum(r["train_s"] + r["eval_s"] for r in timed.values())
        parts = ", ".join(f"{s} {r['train_s']:.0f} + {r['eval_s']:.0f}" for s, r in timed.items())
        lines += [f"Wall time, seconds (train + evaluation): {parts}; {total / 60:.1f} minutes in all.", ""]
    figures = len(lines)
    lines += [*plots, ""]
    for stage, r in results.items():
        if not isinstance(r, dict) or "samples" not in r:
            continue
        lines += [f"## Greedy answers after {stage}", ""]
        lines += report.table(
            ["prompt", "response", "gold"],
            [[f"`{s['prompt']}`", f"`{s['response']!r}`", f"{s['gold_reward']:.2f}"] for s in r["samples"]],
        )
        lines.append("")
    path = os.path.join(workdir, "report.md")
    report.write(path, lines, {"stages": {**results, **policies}})  # policies: merged numbers, ppo_ema
    print("\n".join(lines[:figures]))
    print(f"report: {path}")


if __name__ == "__main__":
    app.run(main)
