"""GSPO (Zheng et al. 2025, Group Sequence Policy Optimization): GRPO's group advantages with a sequence-level
importance ratio, clipped per sequence.

    s_i = (pi(y_i | x) / pi_old(y_i | x))^(1 / |y_i|) = exp(mean over y_i's tokens of (log pi - log pi_old))
    l_i = -min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i)
    loss = (1 / M) sum_i l_i                                   (aggregation seq_mean_token_mean, the paper's)

A_i is GRPO's (the score standardised within the prompt's group, ``grpo.advantages``, or only centred with
``std_normalize`` False); the rollout puts it on every response token and the loss reads it back as the mean
over the response. Every token of a response gets the same weight in the gradient (s_i A_i mean_t grad log
pi), so a sequence is kept or clipped whole. The length-normalised ratio stays much nearer 1 than a token's
ratio: the paper clips at 3e-4 / 4e-4.

``aggregation`` reads l_i as the loss of each of the response's n_i tokens (``ppo.py``'s names): token_mean
sum_i n_i l_i / N (a response weighs as its length), seq_mean_token_sum sum_i n_i l_i / M,
seq_mean_token_sum_norm sum_i n_i l_i / (M length_norm) (0: the rows' length), seq_mean_token_mean the
paper's. M counts the responses and N their tokens; the loss reports (sum over the micro-batch's responses,
their number or tokens), so micro-batches add up exactly with no denominators. No KL term (the paper's);
``kl_ref`` (k3 per response token against the reference) is logged only. A truncated importance weight per
token (``is_weight_BL``) has no place in a sequence ratio: a batch with one is refused.

Options (``OBJECTIVE``): clip_low, clip_high, std_eps, std_normalize, aggregation, length_norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.losses import grpo, ppo
from gptjax.losses.kl import kl_penalty
from gptjax.losses.objective import Objective


def sequence_loss(
    log_ratio_B: jax.Array, adv_B: jax.Array, clip_low: float, clip_high: float
) -> tuple[jax.Array, jax.Array]:
    """Per sequence max(-s A, -clip(s, 1 - low, 1 + high) A), s = exp(log_ratio_B) (the length-normalised
    log-ratio); and whether the clipped branch was taken (no gradient there)."""
    s_B = jnp.exp(log_ratio_B)
    unclipped_B = -adv_B * s_B
    clipped_B = -adv_B * jnp.clip(s_B, 1.0 - clip_low, 1.0 + clip_high)
    return jnp.maximum(unclipped_B, clipped_B), clipped_B > unclipped_B


def loss_fn(params, batch: dict, rng: jax.Array, ctx) -> tuple[jax.Array, dict]:
    del rng
    opts = OBJECTIVE.options_of(ctx.loss_cfg)
    if "is_weight_BL" in batch:
        raise ValueError(
            "gspo: the batch has per-token importance weights (is_weight_BL); GSPO's ratio is per sequence"
        )
    if opts.aggregation not in ppo.AGGREGATIONS:
        raise ValueError(f"loss.aggregation={opts.aggregation!r}; use one of {ppo.AGGREGATIONS}")
    mask_BL = ppo.rollout_mask(batch)
    n_B = jnp.sum(mask_BL, axis=1).astype(jnp.float32)
    has_B = n_B > 0  # a row with no response token has no ratio
    per_row = lambda x_BL: jnp.sum(jnp.where(mask_BL, x_BL, 0.0), axis=1) / jnp.maximum(n_B, 1.0)

    temperature = ctx.scalars.get("temperature", 1.0)
    logp_BL, entropy_BL = ppo.policy_terms(ctx.cfg_of("policy"), params["policy"], batch, temperature)
    token_log_ratio_BL = logp_BL - batch["old_logp_BL"]
    log_ratio_B = per_row(token_log_ratio_BL)
    adv_B = per_row(batch["advantages_BL"])
    loss_B, clipped_B = sequence_loss(log_ratio_B, adv_B, opts.clip_low, opts.clip_high)

    def over_rows(x_B):
        return jnp.sum(jnp.where(has_B, x_B, 0.0)), jnp.sum(has_B).astype(jnp.float32)

    def over_tokens(x_BL):
        return jnp.sum(jnp.where(mask_BL, x_BL, 0.0)), jnp.sum(n_B)

    loss_sum, rows = over_rows(loss_B)
    if opts.aggregation == "seq_mean_token_mean":
        total = (loss_sum, rows)
    else:  # l_i on each of the response's tokens
        token_sum = jnp.sum(jnp.where(has_B, n_B * loss_B, 0.0))
        if opts.aggregation == "token_mean":
            total = (token_sum, jnp.sum(n_B))
        else:
            norm = (
                (opts.length_norm or mask_BL.shape[1])
                if opts.aggregation == "seq_mean_token_sum_norm"
                else 1.0
            )
            total = (token_sum / norm, rows)
    metrics = {
        "loss": total,
        "policy_loss": (loss_sum, rows),
        "policy_clipfrac": over_rows(clipped_B.astype(jnp.float32)),  # of sequences
        "sequence_ratio": over_rows(jnp.exp(log_ratio_B)),
        "entropy": over_tokens(entropy_BL),
        "approx_kl": over_tokens(jnp.expm1(-token_log_ratio_BL) + token_log_ratio_BL),  # old -> new, k3
        "kl_ref": over_tokens(kl_penalty(logp_BL, batch["ref_logp_BL"], "k3")),
    }
    return total[0], metrics


OBJECTIVE = Objective(
    loss_fn=loss_fn,
    data=("prompts",),
    frozen=("ref", "reward"),
    min_group=2,  # GRPO's group-standardised score
    kl="none",
    advantages=grpo.token_advantages,  # reads std_eps, std_normalize
    options={
        "clip_low": 3e-4,
        "clip_high": 4e-4,
        "std_eps": 1e-4,
        "std_normalize": True,
        "aggregation": "seq_mean_token_mean",
        "length_norm": 0.0,
    },
)
