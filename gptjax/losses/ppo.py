"""PPO: clipped policy loss + clipped value loss (+ entropy bonus) (+ PPO-ptx: LM loss on pretraining text).

Trained roles 'policy' (LM head) and 'value' (scalar head) update in one step; a batch is one minibatch of a
rollout's experience (``gptjax.rl.experience``: tokens_BL, prompt_lengths_B, lengths_B, old_logp_BL,
old_values_BL, advantages_BL, returns_BL, optionally is_weight_BL) plus, for PPO-ptx, a pretraining batch
(ptx_inputs_BL, ptx_targets_BL, ptx_weights_BL, ...).

    loss = Agg(w_t pg_t + vf_coef * vf_t - entropy_coef * H_t) + ptx_coef * ptx_sum / N_ptx
    pg_t = max(-A_t r_t, -A_t clip(r_t, 1 - clip_low, 1 + clip_high)),   r_t = pi(y_t) / pi_old(y_t)

w_t is the batch's ``is_weight_BL`` where it has one (truncated importance sampling: min(pi_old / pi_sampler,
C) from the rollout, a constant here) and 1 otherwise; it weights the policy-gradient term only.

``Agg`` (``loss.aggregation``) turns per-token terms x_it (response i, token t; n_i its tokens) into the loss,
each over FULL-batch counts (``denominators``: N response tokens, M responses), so micro-batches add up to
exactly the big-batch loss:

    token_mean                sum_i sum_t x_it / N          every token alike (DAPO's; the default)
    seq_mean_token_sum        sum_i sum_t x_it / M          a response's tokens summed, responses averaged
    seq_mean_token_sum_norm   sum_i sum_t x_it / (M L_norm) the same over a constant (Dr. GRPO's), L_norm =
                                                            ``length_norm`` (0: the rows' length L)
    seq_mean_token_mean       sum_i (1/n_i) sum_t x_it / M  each response's token mean, averaged (the GRPO
                                                            paper's)

All but seq_mean_token_mean give every token of a batch the same weight whatever its response's length;
token_mean's, 1 / N, still changes with the batch's total length, seq_mean_token_sum_norm's does not.
N_ptx = weighted pretraining tokens of the full batch. With separate roles and optimizers ``vf_coef`` scales
the value gradient before its own clipping only. The metrics stay per response token whatever the
aggregation.

Options (``OBJECTIVE``): clip, value_clip (0 = off), vf_coef, entropy_coef, ptx_coef, aggregation,
length_norm; ``clip_low`` / ``clip_high`` (DAPO's clip-higher) where config.loss has them, else both = clip.
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

AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm", "seq_mean_token_mean")


def policy_loss(
    logp_BT: jax.Array, old_logp_BT: jax.Array, adv_BT: jax.Array, clip: float, clip_high: float | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-token clipped surrogate max(-A r, -A clip(r, 1 - clip, 1 + clip_high)), r = exp(logp - old)
    (clip_high None: = clip); and whether the clipped branch was taken (its gradient is zero there)."""
    high = clip if clip_high is None else clip_high
    ratio_BT = jnp.exp(logp_BT - old_logp_BT)
    unclipped_BT = -adv_BT * ratio_BT
    clipped_BT = -adv_BT * jnp.clip(ratio_BT, 1.0 - clip, 1.0 + high)
    return jnp.maximum(unclipped_BT, clipped_BT), clipped_BT > unclipped_BT


def clip_range(opts) -> tuple[float, float]:
    """(eps_low, eps_high): ``clip_low`` / ``clip_high`` where the options have them (DAPO), else ``clip``."""
    low = opts.clip_low if "clip_low" in opts else opts.clip
    high = opts.clip_high if "clip_high" in opts else opts.clip
    return low, high


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
    """Full-batch counts: response tokens, responses (rows with a response token), pretraining tokens."""
    del ctx
    mask_BL = rollout_mask(batch)
    out = {
        "tokens": jnp.sum(mask_BL).astype(jnp.float32),
        "responses": jnp.sum(jnp.any(mask_BL, axis=1)).astype(jnp.float32),
    }
    if "ptx_weights_BL" in batch:
        out["ptx_tokens"] = jnp.sum(batch["ptx_weights_BL"]).astype(jnp.float32)
    return out


class Aggregation(NamedTuple):
    """``loss.aggregation`` over one micro-batch: loss = total(x_BL) / denominator."""

    total: Callable[
        [jax.Array], jax.Array
    ]  # x_BL -> the micro-batch's (row-weighted) sum over response tokens
    denominator: jax.Array  # of the FULL batch (ctx.denominators): N, M or M L_norm
    share: jax.Array  # this micro-batch's part of it (metrics["loss"]'s count: the shares add up to 1)


def aggregation(mask_BL: jax.Array, ctx, how: str = "token_mean", length_norm: float = 0.0) -> Aggregation:
    """The aggregation ``how`` (module doc) of per-token terms on the response tokens ``mask_BL``."""
    if how not in AGGREGATIONS:
        raise ValueError(f"loss.aggregation={how!r}; use one of {AGGREGATIONS}")
    if how == "token_mean":
        n = jnp.maximum(ctx.denominators["tokens"], 1.0)
        return Aggregation(
            lambda x_BL: jnp.sum(jnp.where(mask_BL, x_BL, 0.0)), n, jnp.sum(mask_BL).astype(jnp.float32) / n
        )
    if length_norm < 0:
        raise ValueError(f"loss.length_norm={length_norm}: must be >= 0 (0: the rows' length)")
    n_B = jnp.sum(mask_BL, axis=1).astype(jnp.float32)
    rows = jnp.sum(n_B > 0).astype(jnp.float32)
    m = jnp.maximum(ctx.denominators["responses"], 1.0)
    if how == "seq_mean_token_mean":
        w_B1 = (1.0 / jnp.maximum(n_B, 1.0))[:, None]
        return Aggregation(lambda x_BL: jnp.sum(jnp.where(mask_BL, x_BL * w_B1, 0.0)), m, rows / m)
    scale = (length_norm or mask_BL.shape[1]) if how == "seq_mean_token_sum_norm" else 1.0
    return Aggregation(lambda x_BL: jnp.sum(jnp.where(mask_BL, x_BL, 0.0)), m * scale, rows / m)


def policy_terms(cfg, params, batch: dict, temperature) -> tuple[jax.Array, jax.Array]:
    """(logp_BL, entropy_BL) of the policy at the sampling temperature, aligned with the tokens."""
    terms = next_token_terms(cfg, params, batch["tokens_BL"], temperature=temperature, entropy=True)
    return terms["logp"], terms["entropy"]


class Surrogate(NamedTuple):
    masked_sum: Callable[[jax.Array], jax.Array]  # plain sum over the micro-batch's response tokens
    agg: Aggregation  # loss.aggregation: the loss is agg.total(terms) / agg.denominator
    count: jax.Array  # response tokens of this micro-batch (the metrics' weight)
    logp_BL: jax.Array
    pg_total: jax.Array  # agg.total of the (importance-weighted) clipped surrogate
    entropy_total: jax.Array  # agg.total of the entropy
    metrics: dict  # policy_loss, entropy, policy_clipfrac, approx_kl (is_weight) as (sum, count)


def clipped_surrogate(params, batch: dict, ctx, opts) -> Surrogate:
    """The policy side that PPO and the group objectives (GRPO, RLOO, ...) share: the clipped surrogate of the
    batch's advantages at the sampling temperature (times ``is_weight_BL`` where the batch has it), its
    aggregation (``opts.aggregation``, default token_mean) and its diagnostics."""
    mask_BL = rollout_mask(batch)
    count = jnp.sum(mask_BL).astype(jnp.float32)

    def masked_sum(x_BL):
        return jnp.sum(jnp.where(mask_BL, x_BL, 0.0))

    agg = aggregation(mask_BL, ctx, opts.get("aggregation", "token_mean"), opts.get("length_norm", 0.0))
    temperature = ctx.scalars.get("temperature", 1.0)
    logp_BL, entropy_BL = policy_terms(ctx.cfg_of("policy"), params["policy"], batch, temperature)
    pg_BL, clipped_BL = policy_loss(logp_BL, batch["old_logp_BL"], batch["advantages_BL"], *clip_range(opts))
    log_ratio_BL = logp_BL - batch["old_logp_BL"]
    metrics = {}
    if "is_weight_BL" in batch:  # computed by the rollout; never differentiated
        is_weight_BL = jax.lax.stop_gradient(batch["is_weight_BL"]).astype(jnp.float32)
        pg_BL = pg_BL * is_weight_BL
        metrics["is_weight"] = (masked_sum(is_weight_BL), count)
    metrics.update(
        policy_loss=(masked_sum(pg_BL), count),
        entropy=(masked_sum(entropy_BL), count),
        policy_clipfrac=(masked_sum(clipped_BL.astype(jnp.float32)), count),
        # old -> new policy: k3, never negative (Schulman's approximation)
        approx_kl=(masked_sum(jnp.expm1(-log_ratio_BL) + log_ratio_BL), count),
    )
    return Surrogate(masked_sum, agg, count, logp_BL, agg.total(pg_BL), agg.total(entropy_BL), metrics)


def loss_fn(params, batch: dict, rng: jax.Array, ctx) -> tuple[jax.Array, dict]:
    del rng
    opts = OBJECTIVE.options_of(ctx.loss_cfg)
    sur = clipped_surrogate(params, batch, ctx, opts)
    masked_sum, agg, count = sur.masked_sum, sur.agg, sur.count
    out = model.apply(ctx.cfg_of("value"), params["value"], batch["tokens_BL"]).astype(jnp.float32)
    values_BL = shift_right(out)
    vf_BL, vf_clipped_BL = value_loss(values_BL, batch["old_values_BL"], batch["returns_BL"], opts.value_clip)

    vf_total = agg.total(vf_BL)
    loss = (sur.pg_total + opts.vf_coef * vf_total - opts.entropy_coef * sur.entropy_total) / agg.denominator
    metrics = {
        **sur.metrics,
        "value_loss": (masked_sum(vf_BL), count),
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
    # The loss is already normalised by the full batch: each micro-batch counts its share of it.
    metrics["loss"] = (loss, agg.share)
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
    options={
        "clip": 0.2,
        "value_clip": 0.2,
        "vf_coef": 0.5,
        "entropy_coef": 0.0,
        "ptx_coef": 0.0,
        "aggregation": "token_mean",
        "length_norm": 0.0,
    },
)
