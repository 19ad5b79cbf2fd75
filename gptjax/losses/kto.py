"""KTO (Ethayarajh et al. 2024, Kahneman-Tversky Optimisation) from ranking data, against a frozen reference.

Reads 'rm' ranking batches (K responses per prompt, best -> worst): a prompt's best response is a desirable
example and its worst an undesirable one, each scored on its own (the loss never compares the two), so the
same loss takes unpaired data. A prompt with fewer than two valid responses has no label and is skipped.

    rho = log pi(y | x) - log ref(y | x)          summed over the response (its implicit reward: beta * rho)
    z0  = max(0, mean of rho over the batch's valid responses)   (a KL(pi || ref) estimate, no gradient)
    loss(y desirable)   = lambda_D * (1 - sigmoid(beta * (rho - z0)))
    loss(y undesirable) = lambda_U * (1 - sigmoid(beta * (z0 - rho)))

The loss is the mean over the counted responses, reported as (sum, count), so micro-batches add up exactly
for a given z0. z0 is estimated on the batch the loss sees: under gradient accumulation, each micro-batch's
own estimate (its expectation is the same; at the start, policy == ref, it is 0 either way).

Options (``OBJECTIVE``): beta (0.1), desirable_weight (lambda_D), undesirable_weight (lambda_U). Metrics:
DPO's (pairwise accuracy, margin, chosen and rejected reward over all valid pairs of a ranking), so the two
compare directly, and ``reference_point`` (z0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.losses.logprobs import sequence_logprobs
from gptjax.losses.objective import Objective
from gptjax.losses.ranking import pair_metrics


def kto_loss(
    rho_B: jax.Array,
    desirable_B: jax.Array,
    z0: jax.Array,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> jax.Array:
    """losses_B: lambda_D (1 - sigmoid(beta (rho - z0))) where desirable, else lambda_U (1 - sigmoid(beta
    (z0 - rho))); rho = log pi - log ref of each response, summed over its tokens."""
    desirable_B = jnp.asarray(desirable_B, bool)
    x_B = beta * jnp.where(desirable_B, rho_B - z0, z0 - rho_B)
    weight_B = jnp.where(desirable_B, desirable_weight, undesirable_weight)
    return weight_B * (1.0 - jax.nn.sigmoid(x_B))


def labels(valid_BK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(desirable_BK, undesirable_BK): the first and the last valid response of each prompt with >= 2."""
    K = valid_BK.shape[-1]
    first_B = jnp.argmax(valid_BK, axis=-1)
    last_B = K - 1 - jnp.argmax(valid_BK[..., ::-1], axis=-1)
    counted_B1 = (jnp.sum(valid_BK, axis=-1) >= 2)[..., None]
    k_K = jnp.arange(K)
    return counted_B1 & (k_K == first_B[..., None]), counted_B1 & (k_K == last_B[..., None])


def loss_fn(params, batch: dict, rng: jax.Array, ctx) -> tuple[jax.Array, dict]:
    """KTO on each prompt's best and worst response, mean per counted response; metrics (sum, count)."""
    opts = OBJECTIVE.options_of(ctx.loss_cfg)
    seq = (batch["tokens_BKL"], batch["prompt_lengths_BK"], batch["lengths_BK"])
    valid_BK = batch["valid_BK"]

    dropout = rng if getattr(ctx.model_cfg, "lora_dropout", 0.0) > 0 else None
    pi_BK = sequence_logprobs(ctx.model_cfg, params, *seq, dropout_rng=dropout)
    ref_BK = jax.lax.stop_gradient(sequence_logprobs(ctx.cfg_of("ref"), ctx.frozen_params("ref"), *seq))
    rho_BK = jnp.where(valid_BK, pi_BK - ref_BK, 0.0)

    n_valid = jnp.sum(valid_BK).astype(jnp.float32)
    z0 = jax.lax.stop_gradient(jnp.maximum(jnp.sum(rho_BK) / jnp.maximum(n_valid, 1.0), 0.0))
    desirable_BK, undesirable_BK = labels(valid_BK)
    losses_BK = kto_loss(rho_BK, desirable_BK, z0, opts.beta, opts.desirable_weight, opts.undesirable_weight)
    counted_BK = desirable_BK | undesirable_BK
    loss_sum = jnp.sum(jnp.where(counted_BK, losses_BK, 0.0))
    count = jnp.sum(counted_BK).astype(jnp.float32)

    reward_BK = opts.beta * rho_BK

    def over(x_BK, where_BK):
        return jnp.sum(jnp.where(where_BK, x_BK, 0.0)), jnp.sum(where_BK).astype(jnp.float32)

    metrics = {
        "loss": (loss_sum, count),
        **pair_metrics(reward_BK, valid_BK),  # DPO's, so the two compare directly
        "desirable_reward": over(reward_BK, desirable_BK),
        "undesirable_reward": over(reward_BK, undesirable_BK),
        "reference_point": (z0, jnp.float32(1.0)),  # z0 in nats; averaged over micro-batches
    }
    return loss_sum, metrics


OBJECTIVE = Objective(
    loss_fn=loss_fn,
    data=("rm",),
    frozen=("ref",),
    options={"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
)
