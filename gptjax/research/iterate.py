"""Iterated RLHF on the tiny task, and the policy and reward-model numbers the demo reports (evaluators).

InstructGPT collected comparisons of its current best policies' samples, retrained the reward model and ran
PPO again. Here a round is: K = 4 samples of the current policy on fresh RM-bucket prompts, ranked by the
simulated labelers; an RM from SFT on every comparison so far (the original ones included); PPO from the
current policy (reference: SFT; critic: the new RM) against it; the new policy's gold reward against SFT's
on the held-out prompts. A finished round is not run again (its results.json is the marker).

    rows = iterate.rounds(root, "configs/tiny.py", 2, first=results["ppo"], rm_config=..., rm_first=...)

``compare`` and ``rm_numbers`` are what ``scripts/pipeline.py`` reports for each stage.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
from absl import logging
from ml_collections import ConfigDict

from gptjax import checkpoint, data, evals, train
from gptjax.data import tiny
from gptjax.evals import evaluate
from gptjax.rl import bon
from gptjax.train import defaults

POLICY_ROLE = {"ppo": "policy"}  # the LM role of a multi-role stage
SAMPLES_PER_PROMPT = 4  # a round's samples of each prompt, ranked by the labelers (K)


def finished(workdir: str, steps: int) -> bool:
    """Whether ``workdir`` holds a checkpoint at ``steps`` or later."""
    try:
        return checkpoint.load_meta(workdir)[0] >= steps
    except FileNotFoundError:
        return False


def compare(root: str, stage: str, workdir: str, vocab, *, prompts: int, samples: int) -> dict[str, dict]:
    """The gold evaluator for the stage's policy (and PPO's EMA) and the SFT model under ``root``, on the
    same prompts and keys: sampled gold reward (mean, SE), the RM's score (``root``/rm, once trained), KL to
    SFT; and each policy's gold reward minus SFT's, paired by prompt."""
    sft_dir, rm_dir = os.path.join(root, "sft"), os.path.join(root, "rm")
    policies = {stage: lambda: checkpoint.load_model(workdir, role=POLICY_ROLE.get(stage))}
    if stage == "ppo":
        policies["ppo_ema"] = lambda: checkpoint.load_model(workdir, role="policy", ema=True)
    if stage != "sft":
        policies["sft"] = lambda: evals.load_model(sft_dir)
    reward = rm_dir if finished(rm_dir, 1) else ""
    out = {}
    for name, load in policies.items():
        inputs = evals.Inputs.of_models({"policy": load()}, vocab)
        out[name] = evals.measure(
            "gold", inputs, prompts=prompts, samples=samples, greedy=False, ref=sft_dir, reward=reward
        )
    for name in policies:
        if name != "sft" and "sft" in out:
            diff, se = evaluate.paired_difference(out[name], out["sft"])
            out[name].update(gold_vs_sft=diff, gold_vs_sft_se=se, gold_vs_sft_z=diff / max(se, 1e-12))
    return out


def greedy(cfg_params: tuple, vocab, prompts: int) -> dict[str, Any]:
    """The gold evaluator's greedy answers only: greedy_gold_reward, greedy_eos_rate, ..., samples."""
    return evals.measure(
        "gold", evals.Inputs.of_models({"policy": cfg_params}, vocab), prompts=prompts, samples=0
    )


def rm_numbers(config: ConfigDict, workdir: str, vocab, examples: int) -> dict[str, Any]:
    """The rm_accuracy evaluator on the reward model in ``workdir`` (its run's held-out rankings and
    settings): pairwise accuracy, gold agreement, reward mean / std, the demonstrations' mean score."""
    inputs = evals.Inputs.of_models({"model": checkpoint.load_model(workdir)}, vocab, config=config)
    return evals.measure("rm_accuracy", inputs, examples=examples)


def rounds(
    root: str,
    config_file: str,
    n_rounds: int,
    *,
    first: dict,
    rm_config: ConfigDict,
    rm_first: dict | None = None,
    prompts_per_round: int = 500,
    eval_prompts: int = 200,
    eval_samples: int = 4,
    rm_examples: int = 200,
) -> list[dict]:
    """Rows of round 0 (``first``: the PPO stage's numbers, ``rm_first``: its RM's) and rounds 1..n (module
    doc); ``rm_config`` is the RM stage's config each round retrains from, with the rounds' comparisons
    added to its data."""
    vocab = data.get_vocabulary(rm_config.data)
    sft_dir = os.path.join(root, "sft")
    policy_dir, rank_files = os.path.join(root, "ppo"), []
    rows = [
        {
            "round": 0,
            "gold": first["gold_reward_mean"],
            "gold_se": first["gold_reward_se"],
            "gold_vs_sft": first.get("gold_vs_sft"),
            "kl": first.get("kl_to_ref"),
            "rm_accuracy": (rm_first or {}).get("pairwise_accuracy"),
        }
    ]
    for r in range(1, n_rounds + 1):
        here = os.path.join(root, f"round_{r}")
        saved = os.path.join(here, "results.json")
        comparisons = os.path.join(here, "comparisons.jsonl")
        rank_files.append(comparisons)
        if os.path.exists(saved):
            with open(saved) as f:
                rows.append(json.load(f))
            policy_dir = os.path.join(here, "ppo")
            continue
        os.makedirs(here, exist_ok=True)
        start = time.perf_counter()
        if not os.path.exists(comparisons):
            cfg, params = checkpoint.load_model(policy_dir, role="policy")
            prompts = tiny.rm_prompts(100 + r, prompts_per_round)
            k = SAMPLES_PER_PROMPT
            texts, _ = bon.sample(
                cfg, params, vocab, prompts, n=k, rng=jax.random.key(100 + r), max_new_tokens=16
            )
            samples = [texts[i * k : (i + 1) * k] for i in range(len(prompts))]
            records, skipped = tiny.label_samples(100 + r, prompts, samples)
            logging.info(
                "round %d: %d prompts ranked, %d with < 2 distinct samples skipped", r, len(records), skipped
            )
            with open(comparisons + ".tmp", "w") as f:
                f.writelines(json.dumps(rec) + "\n" for rec in records)
            os.replace(comparisons + ".tmp", comparisons)
        c = rm_config.copy_and_resolve_references()
        c.unlock()
        for i, path in enumerate(rank_files):
            c.data.sources[f"round_{i + 1}"] = data.source(format="rank", path=path)
        c.lock()
        rm_dir = os.path.join(here, "rm")
        if not finished(rm_dir, c.train.steps):
            train.run(c, rm_dir)
        rm_eval = rm_numbers(c, rm_dir, vocab, rm_examples)
        ppo_config = defaults.load_config(f"{config_file}:stage=ppo,sft={sft_dir},rm={rm_dir}")
        ppo_config.unlock()
        ppo_config.roles.policy.init_from = policy_dir
        ppo_config.roles.policy.init_role = "policy"
        ppo_config.lock()
        ppo_dir = os.path.join(here, "ppo")
        if not finished(ppo_dir, ppo_config.train.steps):
            train.run(ppo_config, ppo_dir)
        policy_dir = ppo_dir
        cmp = compare(root, "ppo", ppo_dir, vocab, prompts=eval_prompts, samples=eval_samples)["ppo"]
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
