"""RL with verifiable rewards on the built-in arithmetic task: pretrain -> SFT -> an RL objective trained on
the task's checker alone (no reward model), measured on held-out problems.

    python scripts/pipeline.py --recipe rlvr --workdir runs/rlvr                 # `make rlvr`: GRPO
    python scripts/pipeline.py --recipe rlvr --workdir runs/rlvr-cmp \\
        --methods grpo,dr_grpo,dapo,rloo,reinforce_pp,ppo --seeds 0,1,2          # the comparison table

Stages come from ``configs/rlvr.py`` (``stage=pretrain|sft|<method>``); pretraining and SFT run once and
every method starts from the same SFT model. Held-out accuracy is the ``gold`` evaluator with the task's
held-out problems and checker (``gptjax.data.arith``): ``samples`` answers per problem at the training
temperature (mean and standard error over problems) and one greedy answer per problem, the same problems
and keys for every policy, so each method's gain over SFT is paired by problem (``verified_vs_sft`` and its
z). ``<workdir>/results.json`` holds::

    {"stages": {"sft": {"verified_accuracy_mean", "verified_accuracy_se", "greedy_verified_accuracy", ...},
                "grpo": {"verified_accuracy_mean", "verified_accuracy_se", "verified_vs_sft",
                         "verified_vs_sft_se", "verified_vs_sft_z", "greedy_verified_accuracy",
                         "ema": {...}, "tokens_generated", "train_s", ...}},
     "runs": {"<method>/seed<k>": {...}} (with several methods or seeds)}

and ``<workdir>/accuracy.png`` plots the training prompts' accuracy per rollout (smoothed) against the SFT
model's held-out accuracy; ``<workdir>/comparison.md`` tabulates every method and seed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from gptjax import checkpoint, evals, train
from gptjax.data import get_vocabulary
from gptjax.evals import evaluate
from gptjax.research import report
from gptjax.train import defaults, provenance

CONFIG = "configs/rlvr.py"
PROMPTS_FN, CHECKER = "gptjax.data.arith:eval_prompts", "gptjax.data.arith:gold_reward"
METHODS = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "ppo")
REWARD_METRIC = "reward/verified_reward"  # the rollout's mean checker reward on its training prompts


def finished(workdir: str, steps: int) -> bool:
    try:
        return checkpoint.load_meta(workdir)[0] >= steps
    except FileNotFoundError:
        return False


def stage_config(root: str, stage: str, *, seed: int = 0, steps: int = 0, config_file: str = CONFIG):
    """``configs/rlvr.py``'s stage with its upstream workdirs under ``root``; an RL method's policy and
    reference start from ``root``/sft."""
    arg = f"stage={stage}"
    if stage not in ("pretrain", "sft"):
        arg += f",sft={os.path.join(root, 'sft')}"
    c = defaults.load_config(f"{config_file}:{arg}")
    if stage == "sft":
        c.train.init_from = os.path.join(root, "pretrain")
    c.train.seed = seed
    if steps:
        c.train.steps = c.train.checkpoint_every = steps
    return c


def train_stage(config, workdir: str) -> float:
    """Train ``config`` in ``workdir`` unless it finished there from the same start; seconds spent."""
    if finished(workdir, config.train.steps):
        provenance.check_workdir(config, workdir)  # only if it started from the upstream stages as they are
        logging.info("=== %s: finished, not trained again", workdir)
        return 0.0
    logging.info("=== %s", workdir)
    start = time.perf_counter()
    train.run(config, workdir)
    return time.perf_counter() - start


def accuracy(policy: tuple, vocab, *, prompts: int, samples: int, temperature: float, max_new_tokens: int):
    """Held-out accuracy of ``policy`` ((cfg, params)): ``samples`` answers per problem at ``temperature``
    and one greedy answer per problem, checked; ``per_prompt`` for pairing."""
    out = evals.measure(
        "gold",
        evals.Inputs.of_models({"policy": policy}, vocab),
        prompts=prompts,
        prompts_fn=PROMPTS_FN,
        gold=CHECKER,
        samples=samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        greedy=True,
    )
    return {
        "verified_accuracy_mean": out["gold_reward_mean"],
        "verified_accuracy_se": out["gold_reward_se"],
        "greedy_verified_accuracy": out["greedy_gold_reward"],
        "eos_rate": out["eos_rate"],
        "mean_length": out["mean_length"],
        "per_prompt": out["per_prompt"],
        "examples": out.get("samples", [])[:4],
    }


def paired(result: dict, baseline: dict) -> dict:
    """``result``'s gain over ``baseline`` paired by problem: mean, standard error, z."""
    diff, se = evaluate.paired_difference(
        {"per_prompt": result["per_prompt"]}, {"per_prompt": baseline["per_prompt"]}
    )
    return {"verified_vs_sft": diff, "verified_vs_sft_se": se, "verified_vs_sft_z": diff / max(se, 1e-12)}


def run_method(root: str, method: str, seed: int, sft_result: dict, *, steps: int, eval_opts: dict) -> dict:
    """Train ``method`` (seed ``seed``) from ``root``/sft and measure it (and its EMA) against SFT."""
    name = method if seed == 0 else f"{method}-seed{seed}"
    workdir = os.path.join(root, name)
    config = stage_config(root, method, seed=seed, steps=steps)
    train_s = train_stage(config, workdir)
    vocab = get_vocabulary(config.data)
    t = config.rollout.temperature
    out: dict[str, Any] = {"method": method, "seed": seed, "workdir": workdir}
    start = time.perf_counter()
    res = accuracy(checkpoint.load_model(workdir, role="policy"), vocab, temperature=t, **eval_opts)
    out.update(res, **paired(res, sft_result))
    ema = config.roles.policy.optim.ema_decay > 0
    if ema:
        policy = checkpoint.load_model(workdir, role="policy", ema=True)
        res = accuracy(policy, vocab, temperature=t, **eval_opts)
        out["ema"] = {**{k: v for k, v in res.items() if k != "per_prompt"}, **paired(res, sft_result)}
    rollouts = [r for r in report.read_metrics(workdir) if r.get("split") == "rollout"]
    out.update(
        train_s=train_s or evals.read_results(workdir).get("train_s", 0.0),
        eval_s=time.perf_counter() - start,
        rollouts=len(rollouts),
        # every generate call's tokens (DAPO's extra generations too); older runs logged only the kept rows
        tokens_generated=float(
            sum(
                r.get("tokens_generated", r.get("response_length", 0.0) * config.rollout.batch_size)
                for r in rollouts
            )
        ),
        accuracy_per_rollout=[r.get(REWARD_METRIC) for r in rollouts],
    )
    if train_s:
        evals.merge_results(workdir, {"train_s": train_s})
    return out


def run(
    root: str,
    *,
    methods: Sequence[str] = ("grpo",),
    seeds: Sequence[int] = (0,),
    steps: dict[str, int] | None = None,
    prompts: int = 200,
    samples: int = 4,
) -> dict:
    """The recipe (module doc); returns and writes ``root``/results.json."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"rlvr: unknown methods {unknown}; known: {list(METHODS)}")
    steps = steps or {}
    os.makedirs(root, exist_ok=True)
    results: dict[str, Any] = {"stages": {}, "runs": {}}
    for stage in ("pretrain", "sft"):
        config = stage_config(root, stage, steps=steps.get(stage, 0))
        s = train_stage(config, os.path.join(root, stage))
        loss = report.last_row(os.path.join(root, stage)).get("loss")
        results["stages"][stage] = {"train_s": s, "final_train_loss": loss}
    sft_config = stage_config(root, "grpo")  # the RL stages' sampling settings
    eval_opts = dict(prompts=prompts, samples=samples, max_new_tokens=sft_config.rollout.max_new_tokens)
    vocab = get_vocabulary(sft_config.data)
    sft = accuracy(
        checkpoint.load_model(os.path.join(root, "sft")),
        vocab,
        temperature=sft_config.rollout.temperature,
        **eval_opts,
    )
    results["stages"]["sft"].update(sft)
    for method in methods:
        for seed in seeds:
            out = run_method(root, method, seed, sft, steps=steps.get(method, 0), eval_opts=eval_opts)
            key = f"{method}/seed{seed}"
            results["runs"][key] = out
            if seed == seeds[0]:
                results["stages"][method] = out
            logging.info(
                "=== %s: held-out accuracy %.3f +- %.3f (SFT %.3f), %+.3f +- %.3f (z %.1f), greedy %.3f",
                key,
                out["verified_accuracy_mean"],
                out["verified_accuracy_se"],
                sft["verified_accuracy_mean"],
                out["verified_vs_sft"],
                out["verified_vs_sft_se"],
                out["verified_vs_sft_z"],
                out["greedy_verified_accuracy"],
            )
    strip = lambda d: {k: v for k, v in d.items() if k != "per_prompt"}
    results["stages"] = {k: strip(v) for k, v in results["stages"].items()}
    results["runs"] = {k: strip(v) for k, v in results["runs"].items()}
    if len(results["runs"]) == 1:
        del results["runs"]
    evals.merge_results(root, results)
    plot_accuracy(root, results)
    write_comparison(root, results)
    return results


def smooth(values: Sequence[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average, debiased (the first points are not pulled towards 0)."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg, norm = weight * avg + (1 - weight) * v, weight * norm + (1 - weight)
        out.append(avg / norm)
    return out


def plot_accuracy(root: str, results: dict) -> None:
    """accuracy.png: each run's training-prompt accuracy per rollout (raw faint, smoothed), the SFT model's
    held-out accuracy at the training temperature (dashed), each run's held-out accuracy (a marker at its
    last rollout)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results.get("runs") or {m: r for m, r in results["stages"].items() if "accuracy_per_rollout" in r}
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, r) in enumerate(runs.items()):
        ys = [y for y in r.get("accuracy_per_rollout") or [] if y is not None]
        if not ys:
            continue
        xs = np.arange(1, len(ys) + 1)
        color = f"C{i % 10}"
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=1)
        ax.plot(xs, smooth(ys), color=color, linewidth=2, label=f"{name} (training prompts)")
        ax.errorbar(
            [xs[-1]],
            [r["verified_accuracy_mean"]],
            yerr=[r["verified_accuracy_se"]],
            color=color,
            marker="o",
            capsize=3,
        )
    sft = results["stages"].get("sft", {})
    if "verified_accuracy_mean" in sft:
        ax.axhline(sft["verified_accuracy_mean"], color="k", linestyle="--", label="SFT (held-out)")
    ax.set_xlabel("rollout")
    ax.set_ylabel("accuracy (sampled, T=1)")
    ax.set_title("verified accuracy; markers: held-out accuracy after training (+- 1 SE)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(root, "accuracy.png"), dpi=110)
    plt.close(fig)


def write_comparison(root: str, results: dict) -> None:
    """comparison.md: per method, mean over seeds of held-out accuracy, gain over SFT (and its paired z per
    seed), greedy accuracy, tokens generated and wall time."""
    runs = results.get("runs") or {f"{m}/seed0": r for m, r in results["stages"].items() if "method" in r}
    by_method: dict[str, list[dict]] = {}
    for r in runs.values():
        by_method.setdefault(r["method"], []).append(r)
    sft = results["stages"]["sft"]
    acc, greedy = report.fmt(sft["verified_accuracy_mean"]), report.fmt(sft["greedy_verified_accuracy"])
    rows = [["sft", "-", acc, "-", "-", greedy, "-", "-"]]
    for method, rs in by_method.items():
        acc = [r["verified_accuracy_mean"] for r in rs]
        gain = [r["verified_vs_sft"] for r in rs]
        spread = f" +- {np.std(acc, ddof=1) / math.sqrt(len(acc)):.3f}" if len(acc) > 1 else ""
        rows.append(
            [
                method,
                str(len(rs)),
                f"{np.mean(acc):.3f}{spread}",
                f"{np.mean(gain):+.3f}",
                " ".join(f"{r['verified_vs_sft_z']:.1f}" for r in rs),
                report.fmt(float(np.mean([r["greedy_verified_accuracy"] for r in rs]))),
                f"{np.mean([r['tokens_generated'] for r in rs]) / 1e3:.0f}k",
                f"{np.mean([r['train_s'] for r in rs]):.0f}",
            ]
        )
    header = ["method", "seeds", "held-out acc", "vs SFT", "z per seed", "greedy", "tokens", "train s"]
    report.write(os.path.join(root, "comparison.md"), report.table(header, rows))
