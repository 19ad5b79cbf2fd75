"""REINFORCE++ (Hu 2025): REINFORCE with PPO's clipping, no critic and no group: the KL to the reference is a
per-token penalty in the reward and the baseline is the whole rollout batch.

    r_t = -beta * KL_t + [t is the response's last token] * score      (beta: rollout.kl_coef, KL: kl_kind)
    G_t = sum_{s >= t} r_s                                              (gamma 1)
    A_t = (G_t - mean(G)) / std(G)        mean and std over every response token of the rollout batch

The loss is PPO's clipped surrogate on A_t (``grpo.clipped_objective`` without its KL term; times the
rollout's ``is_weight_BL`` where it has one), summed over response tokens and divided by the FULL batch's
response tokens (``denominators``), so micro-batches add up exactly; ``aggregation`` chooses another of
``ppo.py``'s. One response per prompt is enough (``rollout.samples_per_prompt`` >= 1).

Options (``OBJECTIVE``): clip, aggregation, length_norm; ``clip_low`` / ``clip_high`` where config.loss has
them (else both = clip).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.losses import ppo
from gptjax.losses.grpo import clipped_objective
from gptjax.losses.masked import whiten
from gptjax.losses.objective import Objective, ScoredRollout


def token_advantages(scored: ScoredRollout, opts) -> jax.Array:
    """adv_BT: the reward-to-go of each response token, whitened over the rollout batch's response tokens."""
    del opts
    mask_BT = scored.mask_BT
    last_BT = mask_BT & ~jnp.pad(mask_BT[:, 1:], ((0, 0), (0, 1)))  # a response is one run of the mask
    r_BT = jnp.where(mask_BT, -scored.kl_coef * scored.kl_BT, 0.0)
    r_BT = r_BT + jnp.where(last_BT, scored.score_B.astype(jnp.float32)[:, None], 0.0)
    returns_BT = jnp.flip(jnp.cumsum(jnp.flip(r_BT, axis=1), axis=1), axis=1)
    return whiten(returns_BT, mask_BT)


def loss_fn(params, batch: dict, rng: jax.Array, ctx) -> tuple[jax.Array, dict]:
    del rng
    return clipped_objective(params, batch, ctx, OBJECTIVE.options_of(ctx.loss_cfg), kl_coef=0.0)


OBJECTIVE = Objective(
    loss_fn=loss_fn,
    data=("prompts",),
    frozen=("ref", "reward"),
    min_group=1,
    kl="reward",
    denominators=ppo.denominators,
    advantages=token_advantages,
    options={"clip": 0.2, "aggregation": "token_mean", "length_norm": 0.0},
)
