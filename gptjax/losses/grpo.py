"""GRPO (Shao et al. 2024, DeepSeekMath): group-relative advantages, no critic, the KL to ref in the loss.

Each rollout holds ``rollout.samples_per_prompt`` = G responses to each prompt in adjacent rows. A response's
outcome advantage is its reward-model score standardised within its group,

    A_i = (r_i - mean(r_group)) / (std(r_group) + std_eps)      (std with G - 1 in the denominator)

on every one of its tokens; r is the score ``gptjax.rl.experience`` computes for PPO too (``reward_at``,
reward normalisation and clipping, the missing-EOS penalty) without any KL in it. The loss is PPO's clipped
surrogate with the ratio to the sampling policy, plus ``kl_coef`` times the k3 estimate of KL(pi || ref) per
response token:

    loss = (sum_t max(-A r_t, -A clip(r_t, 1 - clip, 1 + clip)) + kl_coef * sum_t k3_t) / N

Normalisation: the sums run over every response token of the batch and N counts the response tokens of the
FULL batch (``denominators``, as in ``ppo.py``), so micro-batches add up exactly. The paper instead averages
over each response's tokens and then over responses, which gives a long response's tokens less weight.

Options (``OBJECTIVE``): clip, kl_coef (the paper's 0.04), std_eps; the batch is an experience minibatch
(tokens_BL, prompt_lengths_B, lengths_B, old_logp_BL, ref_logp_BL, advantages_BL) and
``ctx.scalars['temperature']`` the sampling temperature.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.losses import ppo
from gptjax.losses.kl import kl_penalty
from gptjax.losses.objective import Objective, ScoredRollout


def advantages(score_B: jax.Array, kl_B: jax.Array, kl_coef: jax.Array, group_size: int, opts) -> jax.Array:
    """[B] (r - group mean) / (group std + std_eps) over groups of ``group_size`` adjacent rows; GRPO keeps
    the KL out of the reward (``kl_B`` and ``kl_coef`` are unused)."""
    del kl_B, kl_coef
    r_GN = score_B.astype(jnp.float32).reshape(-1, group_size)
    mean_G1 = jnp.mean(r_GN, axis=1, keepdims=True)
    std_G1 = jnp.std(r_GN, axis=1, keepdims=True, ddof=1)
    return ((r_GN - mean_G1) / (std_G1 + opts.std_eps)).reshape(-1)


def token_advantages(scored: ScoredRollout, opts) -> jax.Array:
    """adv_BT: each response's group advantage (``advantages``) on every one of its tokens."""
    kl_B = jnp.sum(scored.kl_BT, axis=1)
    adv_B = advantages(scored.score_B, kl_B, scored.kl_coef, scored.group_size, opts)
    return jnp.where(scored.mask_BT, adv_B.astype(jnp.float32)[:, None], 0.0)


def clipped_objective(params, batch: dict, ctx, clip: float, kl_coef: float) -> tuple[jax.Array, dict]:
    """The clipped surrogate on the batch's advantages plus ``kl_coef`` x k3 KL to the reference (whose
    log-probs, ``ref_logp_BL``, the experience holds), both over the full batch's response tokens."""
    sur = ppo.clipped_surrogate(params, batch, ctx, clip)
    kl_sum = sur.masked_sum(kl_penalty(sur.logp_BL, batch["ref_logp_BL"], "k3"))
    loss = (sur.pg_sum + kl_coef * kl_sum) / sur.n
    metrics = {
        **sur.metrics,
        "kl_ref": (kl_sum, sur.count),  # k3, per response token, of the policy being trained
        # already normalised by the full batch: each micro-batch counts its share of the tokens
        "loss": (loss, sur.count / sur.n),
    }
    return loss, metrics


def loss_fn(params, batch: dict, rng: jax.Array, ctx) -> tuple[jax.Array, dict]:
    del rng
    opts = OBJECTIVE.options_of(ctx.loss_cfg)
    return clipped_objective(params, batch, ctx, opts.clip, opts.kl_coef)


denominators = ppo.denominators  # the module's name for it (the objective declares it)

OBJECTIVE = Objective(
    loss_fn=loss_fn,
    data=("prompts",),
    frozen=("ref", "reward"),
    min_group=2,  # a standardised score needs a group
    kl="loss",  # loss.kl_coef x k3; the rollout's reward has no KL penalty
    denominators=ppo.denominators,  # response tokens of the full batch
    advantages=token_advantages,
    options={"clip": 0.2, "kl_coef": 0.04, "std_eps": 1e-4},
)
