"""Best-of-n: ``n`` sampled answers of the policy to each held-out prompt, the reward model's best one kept
(the first on ties); the gold reward of the pick (mean, standard error over prompts), its reward-model
score, its EOS rate, and the analytic KL of best-of-n to the policy, log n - (n - 1) / n (Gao et al. 2022).

``draw`` picks an independent pool of samples (a sweep's seeds): key fold_in(key(seed), 1000 + draw).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from gptjax.evals.gold import gold_of, prompts_of, reward_fn
from gptjax.evals.unit import Evaluator, Inputs
from gptjax.rl import bon


def best_of_n(inputs: Inputs, opts) -> dict[str, Any]:

    cfg, params = inputs.model("lm")
    pool = bon.sample_and_score(
        cfg,
        params,
        inputs.vocab,
        prompts_of(opts),
        n=opts.n,
        rng=jax.random.fold_in(jax.random.key(opts.seed), 1000 + opts.draw),
        reward_fn=reward_fn(inputs, opts.reward, opts.reward_seq_len),
        gold=gold_of(opts),
        max_new_tokens=opts.max_new_tokens,
        temperature=opts.temperature,
        batch_size=opts.batch_size,
    )
    best = bon.pick_best(pool["proxy_BN"])
    rows = np.arange(len(best))
    gold_B = pool["gold_BN"][rows, best]
    return {
        "gold_reward_mean": float(gold_B.mean()),
        "gold_reward_se": float(gold_B.std(ddof=1) / math.sqrt(len(gold_B))) if len(gold_B) > 1 else 0.0,
        "per_prompt": gold_B.tolist(),
        "rm_reward_mean": float(pool["proxy_BN"][rows, best].mean()),
        "kl_to_ref": float(bon.kl_bon(opts.n)),
        "eos_rate": float(pool["ended_BN"][rows, best].mean()),
    }


EVALUATOR = Evaluator(
    fn=best_of_n,
    head="lm",
    models=("reward",),
    options={
        "n": 16,
        "reward": "@reward",  # '@ROLE' (the run's) or a workdir / HF directory
        "reward_seq_len": 0,  # 0: the reward model's training sequence length
        "prompts": 200,
        "prompts_fn": "",
        "gold": "",
        "temperature": 1.0,
        "max_new_tokens": 24,
        "batch_size": 128,
        "seed": 1,
        "draw": 0,
    },
)
