"""RLOO (Ahmadian et al. 2024, "Back to Basics"): REINFORCE with a leave-one-out baseline, no critic.

Each rollout holds ``rollout.samples_per_prompt`` = k responses to each prompt in adjacent rows. A response's
reward is its reward-model score (as ``gptjax.rl.experience`` computes it for PPO) less the KL penalty of
the whole sequence, and its baseline the mean reward of the other k - 1 responses to the same prompt:

    r_i = score_i - beta * KL_i,   KL_i = sum_t log pi_old(y_t) - log pi_ref(y_t)   (rollout.kl_kind: k1)
    A_i = r_i - mean_{j != i} r_j                                                   (beta: rollout.kl_coef)

The same A_i sits on every response token, and the loss is PPO's clipped surrogate (its gradient at ratio 1,
a minibatch's first visit, is REINFORCE's; times the rollout's ``is_weight_BL`` where it has one), summed over
response tokens and divided by the FULL batch's response tokens (``denominators``), so micro-batches add up
exactly; ``aggregation`` chooses another of ``ppo.py``'s (per response: seq_mean_token_mean, ...).

Options (``OBJECTIVE``): clip, aggregation, length_norm; ``clip_low`` / ``clip_high`` where config.loss has
them (else both = clip). Metrics as GRPO's (``kl_ref``: the k3 KL to the reference, logged only: RLOO's KL is
in the reward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.losses import ppo
from gptjax.losses.grpo import clipped_objective
from gptjax.losses.objective import Objective, ScoredRollout


def advantages(score_B: jax.Array, kl_B: jax.Array, kl_coef: jax.Array, group_size: int, opts) -> jax.Array:
    """[B] r_i - mean of the other rewards in the group, r = score - kl_coef * kl, groups of ``group_size``
    adjacent rows."""
    del opts
    r_GN = (score_B - kl_coef * kl_B).reshape(-1, group_size)
    others_GN = (r_GN.sum(axis=1, keepdims=True) - r_GN) / (group_size - 1)
    return (r_GN - others_GN).reshape(-1)


def token_advantages(scored: ScoredRollout, opts) -> jax.Array:
    """adv_BT: each response's leave-one-out advantage, its KL summed over its tokens, on every token."""
    kl_B = jnp.sum(scored.kl_BT, axis=1)
    adv_B = advantages(scored.score_B, kl_B, scored.kl_coef, scored.group_size, opts)
    return jnp.where(scored.mask_BT, adv_B.astype(jnp.float32)[:, None], 0.0)


def loss_fn(params, batch: dict, rng: jax.Array, ctx) -> tuple[jax.Array, dict]:
    del rng
    return clipped_objective(params, batch, ctx, OBJECTIVE.options_of(ctx.loss_cfg), kl_coef=0.0)


denominators = ppo.denominators  # the module's name for it (the objective declares it)

OBJECTIVE = Objective(
    loss_fn=loss_fn,
    data=("prompts",),
    frozen=("ref", "reward"),
    min_group=2,  # the baseline is the other responses to the prompt
    kl="reward",
    denominators=ppo.denominators,
    advantages=token_advantages,
    options={"clip": 0.2, "aggregation": "token_mean", "length_norm": 0.0},
)
