"""PPO: clipped policy loss + clipped value loss (+ entropy bonus) (+ PPO-ptx: LM loss on pretraining text).

Trained roles 'policy' (LM head) and 'value' (scalar head) update in one step; a batch is one minibatch of a
rollout's experience (``gptjax.rl.experience``: tokens_BL, prompt_lengths_B, lengths_B, old_logp_BL,
old_values_BL, advantages_BL, returns_BL) plus, for PPO-ptx, a pretraining batch (ptx_inputs_BL,
ptx_targets_BL, ptx_weights_BL, ...).

    loss = (policy_sum + vf_coef * value_sum - entropy_coef * entropy_sum) / N + ptx_coef * ptx_sum / N_ptx

N = response tokens and N_ptx = weighted pretraining tokens of the FULL batch (``denominators``), so
micro-batches add up to exactly the big-batch loss. With separate roles and optimizers ``vf_coef`` scales the
value gradient before its own clipping only.

Options (``OBJECTIVE``): clip, value_clip (0 = off), vf_coef, entropy_coef, ptx_coef;
``ctx.scalars['temperature']`` is the sampling temperature (log-probs are taken from logits / temperature).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gptjax import model
from gptjax.losses import lm
from gptjax.losses.logprobs import next_token_terms, response_mask
from gptjax.losses.masked import shift_right
from gptjax.losses.objective import Objective


def policy_loss(
    logp_BT: jax.Array, old_logp_BT: jax.Array, adv_BT: jax.Array, clip: float
) -> tuple[jax.Array, jax.Array]:
    """Per-token clipped surrogate max(-A r, -A clip(r, 1-eps, 1+eps)), r = exp(logp - old); and whether the
    clipped branch was taken (its gradient is zero there)."""
    ratio_BT = jnp.exp(logp_BT - old_logp_BT)
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * jnp.clip(ratio_BT, 1.0 - clip, 1.0 + clip)
    return jnp.maximum(unclipped_BT, clipped_BT), clipped_BT > unclipped_BT


def value_loss(
    values_BT: jax.Array, old_values_BT: jax.Array, returns_BT: jax.Array, clip: float
) -> tuple[jax.Array, jax.Array]:
    """Per-token 0.5 max((V - R)^2, (V_clipped - R)^2) with V_clipped = old + clip(V - old, +-eps)
    (clip 0: plain 0.5 (V - R)^2); and whether the clipped term was the larger one."""
    unclipped_BT = jnp.square(values_BT - returns_BT)
    if clip <= 0:
        return 0.5 * unclipped_BT, jnp.zeros(values_BT.shape, bool)
    v_clipped_BT = old_values_BT + jnp.clip(values_BT - old_values_BT, -clip, clip)
    clipped_BT = jnp.square(v_clipped_BT - returns_BT)
    return 0.5 * jnp.maximum(unclipped_BT, clipped_BT), clipped_BT > unclipped_BT


def rollout_mask(batch: dict) -> jax.Array:
    """bool [B, L]: the response tokens (prompt_length <= t < length, t >= 1)."""
    L = batch["tokens_BL"].shape[1]
    return response_mask(batch["prompt_lengths_B"], batch["lengths_B"], L) & (jnp.arange(L) >= 1)


def denominators(batch: dict, ctx) -> dict:
    del ctx
    out = {"tokens": jnp.sum(rollout_mask(batch)).astype(jnp.float32)}
    if "ptx_weights_BL" in batch:
        out["ptx_tokens"] = jnp.sum(batch["ptx_weights_BL"]).astype(jnp.float32)
    return out


def policy_terms(cfg, params, batch: dict, temperature) -> tuple[jax.Array, jax.Array]:
    """(logp_BL, entropy_BL) of the policy at the sampling temperature, aligned with the tokens."""
    terms = next_token_terms(cfg, params, batch["tokens_BL"], temperature=temperature, entropy=True)
    return terms["logp"], terms["entropy"]


class Surrogate(NamedTuple):
    masked_sum: Callable[[jax.Array], jax.Array]  # sum over the micro-batch's response tokens
    n: jax.Array  # response tokens of the FULL batch (the loss's denominator)
    count: jax.Array  # response tokens of this micro-batch (the metrics' weight)
    logp_BL: jax.Array
    pg_sum: jax.Array  # the clipped surrogate, summed
    entropy_sum: jax.Array
    metrics: dict  # policy_loss, entropy, policy_clipfrac, approx_kl as (sum, count)


def clipped_surrogate(params, batch: dict, ctx, clip: float) -> Surrogate:
    """The policy side that PPO and the group objectives (GRPO, RLOO) share: the clipped surrogate of the
    batch's advantages at the sampling temperature, its response-token sums and its diagnostics."""
    mask_BL = rollout_mask(batch)
    count = jnp.sum(mask_BL).astype(jnp.float32)

    def masked_sum(x_BL):
        return jnp.sum(jnp.where(mask_BL, x_BL, 0.0))

    temperature = ctx.scalars.get("temperature", 1.0)
    logp_BL, entropy_BL = policy_terms(ctx.cfg_of("policy"), params["policy"], batch, temperature)
    pg_BL, clipped_BL = policy_loss(logp_BL, batch["old_logp_BL"], batch["advantages_BL"], clip)
    log_ratio_BL = logp_BL - batch["old_logp_BL"]
    pg_sum, ent_sum = masked_sum(pg_BL), masked_sum(entropy_BL)
    metrics = {
        "policy_loss": (pg_sum, count),
        "entropy": (ent_sum, count),
        "policy_clipfrac": (masked_sum(clipped_BL.astype(jnp.float32)), count),
        # old -> new policy: k3, never negative (Schulman's approximation)
        "approx_kl": (masked_sum(jnp.expm1(-log_ratio_BL) + log_ratio_BL), count),
    }
    n = jnp.maximum(ctx.denominators["tokens"], 1.0)
    return Surrogate(masked_sum, n, count, logp_BL, pg_sum, ent_sum, metrics)


def loss_fn(params, batch: dict, rng: jax.Array, ctx) -> tuple[jax.Array, dict]:
    del rng
    opts = OBJECTIVE.options_of(ctx.loss_cfg)
    sur = clipped_surrogate(params, batch, ctx, opts.clip)
    masked_sum, n, count = sur.masked_sum, sur.n, sur.count
    out = model.apply(ctx.cfg_of("value"), params["value"], batch["tokens_BL"]).astype(jnp.float32)
    values_BL = shift_right(out)
    vf_BL, vf_clipped_BL = value_loss(values_BL, batch["old_values_BL"], batch["returns_BL"], opts.value_clip)

    vf_sum = masked_sum(vf_BL)
    loss = (sur.pg_sum + opts.vf_coef * vf_sum - opts.entropy_coef * sur.entropy_sum) / n
    metrics = {
        **sur.metrics,
        "value_loss": (vf_sum, count),
        "value_clipfrac": (masked_sum(vf_clipped_BL.astype(jnp.float32)), count),
        "value_error": (masked_sum(jnp.abs(values_BL - batch["returns_BL"])), count),
    }
    if "ptx_inputs_BL" in batch:
        ptx_sum, ptx_metrics = lm.loss_fn(
            params["policy"],
            {k[4:]: v for k, v in batch.items() if k.startswith("ptx_")},
            None,
            ctx.replace(model_cfg=ctx.cfg_of("policy")),
        )
        loss = loss + opts.ptx_coef * ptx_sum / jnp.maximum(ctx.denominators["ptx_tokens"], 1.0)
        metrics["ptx_loss"] = ptx_metrics["loss"]
    # The loss is already normalised by the full batch: each micro-batch counts its share of the tokens.
    metrics["loss"] = (loss, count / n)
    return loss, metrics


# InstructGPT's PPO: the critic's GAE advantages (gptjax.rl.experience), the KL penalty in the reward.
OBJECTIVE = Objective(
    loss_fn=loss_fn,
    data=("prompts",),
    frozen=("ref", "reward"),
    critic=True,
    kl="reward",
    denominators=denominators,
    # ptx_coef: PPO-ptx's gamma (InstructGPT 27.8), with config.ptx.ratio > 0
    options={"clip": 0.2, "value_clip": 0.2, "vf_coef": 0.5, "entropy_coef": 0.0, "ptx_coef": 0.0},
)
