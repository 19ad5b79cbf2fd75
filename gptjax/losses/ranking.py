"""Reward-model ranking loss (InstructGPT K-wise): all C(K,2) pairs of a prompt form one batch element.

Responses are ordered best -> worst along K. A prompt's loss is the mean over its valid pairs (i < j, both
responses valid) of -log sigmoid(r_i - r_j - margin), so a prompt weighs the same whatever its K; the batch
loss is the mean over prompts with at least one pair, reported as (sum, count) so micro-batches add up
exactly.

Options (``OBJECTIVE``): ``margin``, ``center_coef`` (the weight of the mean r^2 of a prompt's responses,
pulling rewards toward zero mean), ``reward_at`` ('last': the value at the EOS, index length - 1 | 'mean':
the mean over the response positions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.losses.logprobs import forward, response_mask
from gptjax.losses.objective import Objective


def pair_mask(valid_BK: jax.Array) -> jax.Array:
    """bool [B, K, K]: True at (i, j) when i < j (i ranked better) and both responses are valid."""
    K = valid_BK.shape[-1]
    upper_KK = jnp.arange(K)[:, None] < jnp.arange(K)[None, :]
    return upper_KK & valid_BK[..., :, None] & valid_BK[..., None, :]


def per_prompt_mean(x_BKK: jax.Array, pairs_BKK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum over prompts of the mean of x over the prompt's pairs, number of prompts with >= 1 pair)."""
    n_B = jnp.sum(pairs_BKK, axis=(-2, -1)).astype(jnp.float32)
    mean_B = jnp.sum(jnp.where(pairs_BKK, x_BKK, 0.0), axis=(-2, -1)) / jnp.maximum(n_B, 1.0)
    has_B = n_B > 0
    return jnp.sum(jnp.where(has_B, mean_B, 0.0)), jnp.sum(has_B).astype(jnp.float32)


def pair_metrics(reward_BK: jax.Array, valid_BK: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
    """(sum, count) over every valid pair of a ranking (row i ranked better than column j) of an implicit
    reward: accuracy (chosen strictly above rejected: a tie is wrong), margin, chosen and rejected reward."""
    pairs_BKK = pair_mask(valid_BK)
    chosen_BKK = jnp.broadcast_to(reward_BK[..., :, None], pairs_BKK.shape)
    rejected_BKK = jnp.broadcast_to(reward_BK[..., None, :], pairs_BKK.shape)
    margin_BKK = chosen_BKK - rejected_BKK
    n_pairs = jnp.sum(pairs_BKK).astype(jnp.float32)

    def over_pairs(x_BKK):
        return jnp.sum(jnp.where(pairs_BKK, x_BKK, 0.0)), n_pairs

    return {
        "accuracy": over_pairs((margin_BKK > 0).astype(jnp.float32)),
        "margin": over_pairs(margin_BKK),
        "chosen_reward": over_pairs(chosen_BKK),
        "rejected_reward": over_pairs(rejected_BKK),
    }


def kwise_loss(
    rewards_BK: jax.Array, valid_BK: jax.Array, margin: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """Per prompt, the mean over its valid pairs of -log sigmoid(r_better - r_worse - margin).

    Returns (sum over prompts, count = number of prompts with at least one valid pair).
    """
    # where (not a product) so a NaN or inf reward at an invalid slot cannot leak into loss or gradient.
    r_BK = jnp.where(valid_BK, rewards_BK.astype(jnp.float32), 0.0)
    diff_BKK = r_BK[..., :, None] - r_BK[..., None, :]
    return per_prompt_mean(-jax.nn.log_sigmoid(diff_BKK - margin), pair_mask(valid_BK))


def rewards(params, batch: dict, ctx, rng: jax.Array | None = None) -> jax.Array:
    """rewards_BK from one forward pass of the scalar-head model over all B*K responses; 0 where invalid."""
    tokens_BKL = batch["tokens_BKL"]
    L = tokens_BKL.shape[-1]
    values_BKL = forward(ctx.model_cfg, params, tokens_BKL, rng).astype(jnp.float32)
    lengths_BK, valid_BK = batch["lengths_BK"], batch["valid_BK"]
    reward_at = OBJECTIVE.options_of(ctx.loss_cfg).reward_at
    if reward_at == "last":
        # Invalid responses have length 0: clip so the gather stays in range, then mask.
        idx_BK = jnp.clip(lengths_BK - 1, 0, L - 1)
        r_BK = jnp.take_along_axis(values_BKL, idx_BK[..., None], axis=-1)[..., 0]
    elif reward_at == "mean":
        mask_BKL = response_mask(batch["prompt_lengths_BK"], lengths_BK, L)
        n_BK = jnp.maximum(jnp.sum(mask_BKL, axis=-1), 1).astype(jnp.float32)
        r_BK = jnp.sum(jnp.where(mask_BKL, values_BKL, 0.0), axis=-1) / n_BK
    else:
        raise ValueError(f"loss.reward_at={reward_at!r}: use 'last' or 'mean'")
    return jnp.where(valid_BK, r_BK, 0.0)


def loss_fn(params, batch: dict, rng: jax.Array, ctx) -> tuple[jax.Array, dict]:
    """K-wise ranking loss (+ reward centering), summed over prompts; metrics as (sum, count).

    accuracy counts pairs with r_better > r_worse strictly (a tie is wrong: a constant RM scores 0).
    """
    use_dropout = getattr(ctx.model_cfg, "lora_dropout", 0.0) > 0
    r_BK = rewards(params, batch, ctx, rng if use_dropout else None)
    valid_BK = batch["valid_BK"]
    opts = OBJECTIVE.options_of(ctx.loss_cfg)
    margin, center_coef = opts.margin, opts.center_coef

    loss_sum, count = kwise_loss(r_BK, valid_BK, margin)
    pairs_BKK = pair_mask(valid_BK)
    if center_coef:
        # Per counted prompt, so the term keeps the loss's denominator (prompts) and micro-batches stay exact.
        n_valid_B = jnp.sum(valid_BK, axis=-1).astype(jnp.float32)
        sq_B = jnp.sum(jnp.where(valid_BK, r_BK**2, 0.0), axis=-1) / jnp.maximum(n_valid_B, 1.0)
        counted_B = jnp.any(pairs_BKK, axis=(-2, -1))
        loss_sum = loss_sum + center_coef * jnp.sum(jnp.where(counted_B, sq_B, 0.0))

    diff_BKK = r_BK[..., :, None] - r_BK[..., None, :]
    n_pairs = jnp.sum(pairs_BKK).astype(jnp.float32)
    n_valid = jnp.sum(valid_BK).astype(jnp.float32)
    metrics = {
        "loss": (loss_sum, count),
        "accuracy": (jnp.sum(pairs_BKK & (diff_BKK > 0)).astype(jnp.float32), n_pairs),
        "margin_mean": (jnp.sum(jnp.where(pairs_BKK, diff_BKK, 0.0)), n_pairs),
        "reward_mean": (jnp.sum(r_BK), n_valid),  # r is 0 where invalid
        "reward_sq": (jnp.sum(r_BK**2), n_valid),
    }
    return loss_sum, metrics


# InstructGPT's K-wise ranking loss on a scalar-head model.
OBJECTIVE = Objective(
    loss_fn=loss_fn,
    data=("rm",),
    options={"margin": 0.0, "center_coef": 0.0, "reward_at": "last"},  # reward_at: 'last' | 'mean'
)
