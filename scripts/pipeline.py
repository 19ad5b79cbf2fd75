"""Run the stages on the built-in tiny task and write a report (numbers + plots) to the workdir.

    python scripts/pipeline.py --workdir runs/demo            # `make demo`: pretrain -> SFT -> RM -> PPO
    python scripts/pipeline.py --workdir runs/q --quick       # a smaller, faster run (smoke test)
    python scripts/pipeline.py --stages pretrain,sft,rm,dpo   # DPO from the SFT model instead of PPO

Each stage starts from the checkpoints its recipe names (SFT from pretrain; RM and DPO from SFT; PPO's policy
and frozen reference from SFT, its critic and frozen reward model from the RM) and is resumable: a finished
stage is not trained again, and rerunning on a finished workdir rebuilds the report.

The policies (SFT, DPO, PPO and PPO's EMA) are compared on held-out prompts by the hidden gold reward of
``--eval_samples`` samples per prompt at temperature 1 (the distribution PPO optimises; mean and standard
error over prompts, paired by prompt for differences), the reward model's score and the KL to the SFT model;
greedy answers are scored too.
"""

from __future__ import annotations

import json
import os
import time

import jax
from absl import app, flags, logging
from ml_collections import FrozenConfigDict

from gptjax import checkpoint, train

from gptjax.train import defaults

from gptjax.evals import evaluate

from gptjax.research import report

from gptjax.rl import reward

from gptjax.train import step
from gptjax.data import get_vocabulary, tiny

STAGES = ("pretrain", "sft", "rm", "ppo", "dpo")
INIT_FROM = {"pretrain": "", "sft": "pretrain", "rm": "sft", "dpo": "sft", "ppo": ""}
POLICY_ROLE = {"ppo": "policy"}  # the LM role of a multi-role stage

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


def finished(workdir: str, steps: int) -> bool:
    try:
        return checkpoint.load_meta(workdir)[0] >= steps
    except FileNotFoundError:
        return False


def reward_scorer(vocab):
    """The RM's scores of (prompt, [responses]) lists, or None before the RM stage has run."""
    rm_dir = os.path.join(FLAGS.workdir, "rm")
    if not finished(rm_dir, 1):
        return None
    rm_config = stage_config("rm")
    cfg, params = checkpoint.load_model(rm_dir)
    ctx = step.Ctx(model_cfg=cfg, loss_cfg=FrozenConfigDict(rm_config.loss))
    return lambda rankings: reward.score(ctx, params, vocab, rankings, rm_config.train.seq_len)


def compare(stage: str, workdir: str, vocab) -> dict:
    """Sampled gold reward (mean, SE), RM reward and KL to SFT of the stage's policy (and PPO's EMA), with
    the SFT model's numbers on the same prompts and keys for the paired difference."""
    policies = {stage: checkpoint.load_model(workdir, role=POLICY_ROLE.get(stage))}
    if stage == "ppo":
        policies["ppo_ema"] = checkpoint.load_model(workdir, role="policy", ema=True)
    sft = checkpoint.load_model(os.path.join(FLAGS.workdir, "sft"))
    if stage != "sft":
        policies["sft"] = sft
    n = 40 if FLAGS.quick else FLAGS.eval_prompts
    out = evaluate.compare_policies(
        policies,
        vocab,
        tiny.eval_prompts(n=n),
        tiny.gold_reward,
        rng=jax.random.key(1),
        ref=sft,
        reward_fn=reward_scorer(vocab),
        samples_per_prompt=FLAGS.eval_samples,
    )
    for name in policies:
        if name != "sft" and "sft" in out:
            diff, se = evaluate.paired_difference(out[name], out["sft"])
            out[name].update(gold_vs_sft=diff, gold_vs_sft_se=se, gold_vs_sft_z=diff / max(se, 1e-12))
    return out


def evaluate_stage(stage: str, config, workdir: str, vocab) -> dict:
    """The stage's numbers for the report: gold reward of greedy and sampled answers (LM stages), or the
    reward model's held-out accuracy, gold agreement and the demonstrations' mean reward (RM)."""
    out = {"final_train_loss": report.last_row(workdir).get("loss")}
    if stage == "rm":
        cfg, params = checkpoint.load_model(workdir)
        ctx = step.Ctx(model_cfg=cfg, loss_cfg=FrozenConfigDict(config.loss))
        n = 40 if FLAGS.quick else 200
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
    if stage == "ppo":
        out["final_train_loss"] = report.last_row(workdir).get("policy_loss")
        out["rollouts"] = report.last_row(workdir, "rollout")
    cfg, params = checkpoint.load_model(workdir, role=POLICY_ROLE.get(stage))
    prompts = tiny.eval_prompts(n=FLAGS.eval_prompts if not FLAGS.quick else 40)
    greedy = evaluate.gold_reward_eval(cfg, params, vocab, prompts, tiny.gold_reward, rng=jax.random.key(0))
    out.update({f"greedy_{k}" if k != "samples" else k: v for k, v in greedy.items()})
    if stage == "sft":  # sampled answers: compared with each later policy on the same prompts and keys
        return out
    sampled = compare(stage, workdir, vocab)
    out.update({k: v for k, v in sampled.pop(stage).items() if k != "per_prompt"})
    out["compared"] = {name: {k: v for k, v in r.items() if k != "per_prompt"} for name, r in sampled.items()}
    if stage == "ppo":
        ema_cfg, ema = checkpoint.load_model(workdir, role="policy", ema=True)
        greedy = evaluate.gold_reward_eval(
            ema_cfg, ema, vocab, prompts, tiny.gold_reward, rng=jax.random.key(0)
        )
        out["compared"]["ppo_ema"]["greedy_gold_reward"] = greedy["gold_reward"]
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
        start = time.perf_counter()
        train.run(config, workdir)
        trained = time.perf_counter()
        results[stage] = evaluate_stage(stage, config, workdir, get_vocabulary(config.data))
        results[stage].update(train_s=trained - start, eval_s=time.perf_counter() - trained)
        with open(saved, "w") as f:
            json.dump(results[stage], f, indent=1)
    if FLAGS.rounds:
        if "ppo" not in results:
            raise app.UsageError("--rounds needs the ppo stage (the first round's policy)")
        results["rounds"] = iterate(results)
    write_report(results)


def iterate(results: dict) -> list[dict]:
    """Iterated RLHF (``--rounds``): per round, K = 4 samples of the current policy on fresh RM-bucket
    prompts ranked by the simulated labelers, an RM from SFT on all comparisons so far (the original ones
    included), PPO from the current policy (reference: SFT; critic: the new RM) against it, and the gold
    reward of the new policy against SFT's on the held-out prompts. Finished rounds are not rerun."""
    from gptjax import data
    from gptjax.rl import bon

    vocab = get_vocabulary(stage_config("sft").data)
    sft_dir = os.path.join(FLAGS.workdir, "sft")
    policy_dir, rank_files, rows = os.path.join(FLAGS.workdir, "ppo"), [], []
    ppo = results["ppo"]
    rows.append(
        {
            "round": 0,
            "gold": ppo["gold_reward_mean"],
            "gold_se": ppo["gold_reward_se"],
            "gold_vs_sft": ppo.get("gold_vs_sft"),
            "kl": ppo.get("kl_to_ref"),
            "rm_accuracy": results.get("rm", {}).get("pairwise_accuracy"),
        }
    )
    for r in range(1, FLAGS.rounds + 1):
        root = os.path.join(FLAGS.workdir, f"round_{r}")
        saved = os.path.join(root, "results.json")
        comparisons = os.path.join(root, "comparisons.jsonl")
        rank_files.append(comparisons)
        if os.path.exists(saved):
            with open(saved) as f:
                rows.append(json.load(f))
            policy_dir = os.path.join(root, "ppo")
            continue
        os.makedirs(root, exist_ok=True)
        start = time.perf_counter()
        if not os.path.exists(comparisons):
            cfg, params = checkpoint.load_model(policy_dir, role="policy")
            prompts = tiny.rm_prompts(100 + r, FLAGS.round_prompts)
            texts, _ = bon.sample(
                cfg, params, vocab, prompts, n=4, rng=jax.random.key(100 + r), max_new_tokens=16
            )
            samples = [texts[i * 4 : (i + 1) * 4] for i in range(len(prompts))]
            records, skipped = tiny.label_samples(100 + r, prompts, samples)
            logging.info(
                "round %d: %d prompts ranked, %d with < 2 distinct samples skipped", r, len(records), skipped
            )
            with open(comparisons + ".tmp", "w") as f:
                f.writelines(json.dumps(rec) + "\n" for rec in records)
            os.replace(comparisons + ".tmp", comparisons)
        rm_config = stage_config("rm")
        rm_config.unlock()
        for i, path in enumerate(rank_files):
            rm_config.data.sources[f"round_{i + 1}"] = data.source(format="rank", path=path)
        rm_config.lock()
        rm_dir = os.path.join(root, "rm")
        if not finished(rm_dir, rm_config.train.steps):
            train.run(rm_config, rm_dir)
        rm_eval = evaluate_stage("rm", rm_config, rm_dir, vocab)
        ppo_config = defaults.load_config(f"{FLAGS.config}:stage=ppo,sft={sft_dir},rm={rm_dir}")
        ppo_config.unlock()
        ppo_config.roles.policy.init_from = policy_dir
        ppo_config.roles.policy.init_role = "policy"
        ppo_config.lock()
        ppo_dir = os.path.join(root, "ppo")
        if not finished(ppo_dir, ppo_config.train.steps):
            train.run(ppo_config, ppo_dir)
        policy_dir = ppo_dir
        cmp = compare("ppo", ppo_dir, vocab)["ppo"]
        row = {
            "round": r,
            "gold": cmp["gold_reward_mean"],
            "gold_se": cmp["gold_reward_se"],
            "gold_vs_sft": cmp["gold_vs_sft"],
            "gold_vs_sft_se": cmp["gold_vs_sft_se"],
            "kl": cmp.get("kl_to_ref"),
            "rm_accuracy": rm_eval["pairwise_accuracy"],
            "rm_gold_agreement": rm_eval.get("gold_agreement"),
            "comparisons_files": len(rank_files),
            "wall_s": time.perf_counter() - start,
        }
        with open(saved, "w") as f:
            json.dump(row, f, indent=1)
        rows.append(row)
    return rows


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


def write_report(results: dict) -> None:
    workdir = FLAGS.workdir
    runs = {s: os.path.join(workdir, s) for s in results}
    report.plot_curves({s: w for s, w in runs.items() if s != "ppo"}, os.path.join(workdir, "loss.png"))
    plots = ["![losses](loss.png)"]
    if "rm" in runs:
        report.plot_curves({"reward model": runs["rm"]}, os.path.join(workdir, "rm_accuracy.png"), "accuracy")
        plots.append("![reward model accuracy](rm_accuracy.png)")
    if "ppo" in runs:
        report.plot_split(
            runs["ppo"], os.path.join(workdir, "ppo.png"), "rollout", ("reward", "kl", "gold_reward")
        )
        plots.insert(0, "![PPO per rollout](ppo.png)")
    policies = policy_rows(results)
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
    print("\n".join(lines[: lines.index(plots[0])]))
    print(f"report: {path}")


if __name__ == "__main__":
    app.run(main)
