"""Gold reward: sampled answers to held-out prompts scored by a programmatic gold reward (mean and standard
error over prompts), and one greedy answer per prompt; on the same samples, where named, the KL to a
reference and a reward model's score. By default the tiny task's held-out prompts and its hidden gold
reward (``gptjax.data.tiny``); ``prompts_fn`` / ``gold`` take any 'module:function'.

The same prompts and keys at every evaluation and for every policy, so two numbers differ by the policy only
and differences pair by prompt (``evaluate.paired_difference`` on ``per_prompt``).
"""

from __future__ import annotations

import json
from typing import Any

import jax
from ml_collections import FrozenConfigDict

from gptjax import checkpoint
from gptjax.data import tiny
from gptjax.evals import evaluate
from gptjax.evals.unit import Evaluator, Inputs, import_spec
from gptjax.losses.ctx import Ctx
from gptjax.rl import reward

GREEDY_SEED, GREEDY_BATCH = 0, 100  # the greedy pass's key (unused at temperature 0) and batch rows


def prompts_of(opts, where: str = "prompts_fn") -> list[str]:
    """``opts.prompts`` held-out prompts: the tiny task's, or ``opts.prompts_fn(n)``'s."""
    if opts.prompts_fn:
        return list(import_spec(opts.prompts_fn, where)(opts.prompts))

    return tiny.eval_prompts(n=opts.prompts)


def gold_of(opts):
    """The gold reward ``f(prompt, response, finished=bool)``: the tiny task's, or ``opts.gold``."""
    if opts.gold:
        return import_spec(opts.gold, "gold")

    return tiny.gold_reward


def reward_fn(inputs: Inputs, ref: str, seq_len: int = 0):
    """``f(rankings) -> scores`` of the reward model ``ref`` ('@reward' or a path), scoring as it was
    trained to (its run's loss.reward_at) at its run's sequence length unless ``seq_len`` is given."""
    cfg, params = inputs.load(ref)
    run = inputs.config
    reward_at = ""
    if ref.startswith("@"):  # the run's frozen role: where it was loaded from, and the rollout's setting
        section = run.get("frozen", {}).get(ref[1:]) if run is not None else None
        path = section.init_from if section is not None else ""
        reward_at = run.get("rollout", {}).get("reward_at", "") if run is not None else ""
    else:
        path = ref.split("#")[0]
    reward_at = reward_at or (reward.trained_reward_at(path) if path else "last")
    seq_len = seq_len or (_run_seq_len(path) if path else 0) or cfg.max_len
    ctx = Ctx(model_cfg=cfg, loss_cfg=FrozenConfigDict({"reward_at": reward_at}))
    return lambda rankings: reward.score(ctx, params, inputs.vocab, rankings, seq_len)


def _run_seq_len(path: str) -> int:
    """The train.seq_len of the run in ``path`` (0 when it has no run config)."""
    try:
        run = checkpoint.load_meta(path)[1].get("config") or "{}"
    except (FileNotFoundError, ValueError):
        return 0
    run = json.loads(run) if isinstance(run, str) else run
    return int((run.get("train") or {}).get("seq_len") or 0)


def gold_reward(inputs: Inputs, opts) -> dict[str, Any]:
    cfg, params = inputs.model("lm")
    prompts, gold = prompts_of(opts), gold_of(opts)
    out: dict[str, Any] = {}
    if opts.samples:
        out.update(
            evaluate.policy_result(
                cfg,
                params,
                inputs.vocab,
                prompts,
                gold,
                rng=jax.random.key(opts.seed),
                ref=inputs.load(opts.ref) if opts.ref else None,
                reward_fn=reward_fn(inputs, opts.reward, opts.reward_seq_len) if opts.reward else None,
                samples_per_prompt=opts.samples,
                temperature=opts.temperature,
                max_new_tokens=opts.max_new_tokens,
                batch_size=opts.batch_size,
            )
        )
    if opts.greedy:
        greedy = evaluate.gold_reward_eval(
            cfg,
            params,
            inputs.vocab,
            prompts,
            gold,
            rng=jax.random.key(GREEDY_SEED),
            max_new_tokens=opts.max_new_tokens,
            batch_size=GREEDY_BATCH,
        )
        out.update({f"greedy_{k}" if k != "samples" else k: v for k, v in greedy.items()})
    return out


EVALUATOR = Evaluator(
    fn=gold_reward,
    head="lm",
    models=("ref", "reward"),
    options={
        "prompts": 200,  # held-out prompts
        "prompts_fn": "",  # 'module:function' f(n) -> prompts; '': the tiny task's held-out prompts
        "gold": "",  # 'module:function' gold(prompt, response, finished=bool); '': the tiny task's
        "samples": 4,  # sampled answers per prompt (0: greedy only)
        "temperature": 1.0,
        "max_new_tokens": 24,
        "batch_size": 128,  # rows per sampling call (part of the samples' identity: keep it to compare)
        "seed": 1,
        "greedy": True,  # also one greedy answer per prompt
        "ref": "",  # KL(policy || ref) on the samples: '@ref' (the run's) or a workdir
        "reward": "",  # the reward model's mean score of the samples: '@reward' or a workdir
        "reward_seq_len": 0,  # 0: the reward model's training sequence length
    },
)
