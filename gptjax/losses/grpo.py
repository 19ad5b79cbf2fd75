"""GRPO (Shao et al. 2024, DeepSeekMath): group-relative advantages, no critic, the KL to ref in the loss.

Each rollout holds ``rollout.samples_per_prompt`` = G responses to each prompt in adjacent rows. A response's
outcome advantage is its reward-model score standardised within its group,

    A_i = (r_i - mean(r_group)) / (std(r_group) + std_eps)      (std with G - 1 in the denominator)
    A_i = r_i - mean(r_group)                                     (std_normalize False: Dr. GRPO's)

on every one of its tokens; r is the score ``gptjax.rl.experience`` computes for PPO too (``reward_at``,
reward normalisation and clipping, the missing-EOS penalty) without any KL in it. The loss is PPO's clipped
surrogate with the ratio to the sampling policy (times the rollout's ``is_weight_BL`` where it has one), plus
``kl_coef`` times a per-token estimate of KL(pi || ref) (``kl_estimator``, ``gptjax.losses.kl.kl_loss``):

    x_t  = w_t max(-A r_t, -A clip(r_t, 1 - clip_low, 1 + clip_high)) + kl_coef * KL_t
    loss = Agg(x)          token_mean: sum over the batch's response tokens / N

``Agg`` is ``loss.aggregation`` (``ppo.py``): token_mean (the default: N counts the response tokens of the
FULL batch) or per response (seq_mean_token_mean, the paper's: each response's token mean, averaged over
responses, which gives a long response's tokens less weight; seq_mean_token_sum; seq_mean_token_sum_norm,
Dr. GRPO's sum over a constant ``length_norm``), each over full-batch counts (``denominators``), so
micro-batches add up exactly.

kl_estimator: 'k3' (the paper's, the default for fidelity) has, on-policy, the gradient of the forward
KL(ref || pi) in expectation, not of KL(pi || ref); 'k2' (its weight the ratio, stop-gradient), 'k3_ratio'
and 'k1' (times the ratio, with its gradient) have the exact gradient of KL(pi || ref) in expectation, on
the first visit of a rollout and after updates alike (``kl.py``). ``kl_ref`` logs k3 whatever the estimator.

Options (``OBJECTIVE``): clip, kl_coef (the paper's 0.04), kl_estimator, std_eps, std_normalize, aggregation,
length_norm (0: the rows' length); ``clip_low`` / ``clip_high`` (DAPO's clip-higher, ``dapo.py``) where
config.loss has them, else both = clip. The batch is an experience minibatch (tokens_BL, prompt_lengths_B,
lengths_B, old_logp_BL, ref_logp_BL, advantages_BL, optionally is_weight_BL) and
``ctx.scalars['temperature']`` the sampling temperature. Dr. GRPO and DAPO are this loss with other defaults
(``dr_grpo.py``, ``dapo.py``: ``objective_with`` their options).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from gptjax.losses import ppo
from gptjax.losses.kl import KL_LOSS_ESTIMATORS, kl_loss, kl_penalty
from gptjax.losses.objective import Objective, ScoredRollout


def advantages(score_B: jax.Array, kl_B: jax.Array, kl_coef: jax.Array, group_size: int, opts) -> jax.Array:
    """[B] (r - group mean) / (group std + std_eps) over groups of ``group_size`` adjacent rows (r - group
    mean with ``opts.std_normalize`` False); GRPO keeps the KL out of the reward (``kl_B`` and ``kl_coef``
    are unused)."""
    del kl_B, kl_coef
    r_GN = score_B.astype(jnp.float32).reshape(-1, group_size)
    mean_G1 = jnp.mean(r_GN, axis=1, keepdims=True)
    if not opts.get("std_normalize", True):
        return (r_GN - mean_G1).reshape(-1)
    std_G1 = jnp.std(r_GN, axis=1, keepdims=True, ddof=1)
    return ((r_GN - mean_G1) / (std_G1 + opts.std_eps)).reshape(-1)


def token_advantages(scored: ScoredRollout, opts) -> jax.Array:
    """adv_BT: each response's group advantage (``advantages``) on every one of its tokens."""
    kl_B = jnp.sum(scored.kl_BT, axis=1)
    adv_B = advantages(scored.score_B, kl_B, scored.kl_coef, scored.group_size, opts)
    return jnp.where(scored.mask_BT, adv_B.astype(jnp.float32)[:, None], 0.0)


def clipped_objective(params, batch: dict, ctx, opts, kl_coef: float = 0.0) -> tuple[jax.Array, dict]:
    """The clipped surrogate on the batch's advantages plus ``kl_coef`` x the ``opts.kl_estimator`` KL to the
    reference (whose log-probs, ``ref_logp_BL``, the experience holds), aggregated by ``opts.aggregation``.
    RLOO and REINFORCE++ call it with kl_coef 0 (their KL is in the reward)."""
    estimator = opts.get("kl_estimator", "k3")
    if estimator not in KL_LOSS_ESTIMATORS:
        raise ValueError(f"loss.kl_estimator={estimator!r}; use one of {KL_LOSS_ESTIMATORS}")
    sur = ppo.clipped_surrogate(params, batch, ctx, opts)
    k3_BL = kl_penalty(sur.logp_BL, batch["ref_logp_BL"], "k3")
    total = sur.pg_total
    metrics = {**sur.metrics, "kl_ref": (sur.masked_sum(k3_BL), sur.count)}  # k3 of the policy being trained
    if kl_coef:  # skipped at 0: an overflowing estimate would make 0 x inf a NaN loss
        kl_BL = (
            k3_BL
            if estimator == "k3"
            else kl_loss(sur.logp_BL, batch["old_logp_BL"], batch["ref_logp_BL"], estimator)
        )
        total = total + kl_coef * sur.agg.total(kl_BL)
        if estimator != "k3":
            metrics["kl_term"] = (sur.masked_sum(kl_BL), sur.count)  # the estimator's own value
    loss = total / sur.agg.denominator
    # already normalised by the full batch: each micro-batch counts its share of the denominator
    metrics["loss"] = (loss, sur.agg.share)
    return loss, metrics


def objective_with(options: Mapping[str, Any]) -> Objective:
    """GRPO's declaration with ``options`` as the option defaults: the same loss (``clipped_objective`` with
    ``kl_coef`` from the options), group advantages, denominators, frozen roles and KL placement. Dr. GRPO and
    DAPO are this with their papers' defaults (``dr_grpo.py``, ``dapo.py``)."""

    def loss_fn(params, batch: dict, rng: jax.Array, ctx) -> tuple[jax.Array, dict]:
        del rng
        opts = obj.options_of(ctx.loss_cfg)
        return clipped_objective(params, batch, ctx, opts, opts.kl_coef)

    obj = Objective(
        loss_fn=loss_fn,
        data=("prompts",),
        frozen=("ref", "reward"),
        min_group=2,  # a group's mean (and std) is the baseline
        kl="loss",  # loss.kl_coef x the kl_estimator's term; the rollout's reward has no KL penalty
        denominators=ppo.denominators,  # response tokens and responses of the full batch
        advantages=token_advantages,  # reads std_normalize, std_eps
        options=options,
    )
    return obj


denominators = ppo.denominators  # the module's name for it (the objective declares it)

OBJECTIVE = objective_with(
    {
        "clip": 0.2,
        "kl_coef": 0.04,
        "kl_estimator": "k3",  # the paper's; biased (module doc): 'k2' has the exact gradient
        "std_eps": 1e-4,
        "std_normalize": True,
        "aggregation": "token_mean",  # the paper's is seq_mean_token_mean
        "length_norm": 0.0,
    }
)
loss_fn = OBJECTIVE.loss_fn
