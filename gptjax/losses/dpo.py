"""Direct preference optimisation (Rafailov et al. 2023) against a frozen reference policy.

Reads 'rm' ranking batches (K responses per prompt, best -> worst). K > 2 rankings become all C(K,2)
(better, worse) pairs of the prompt, and each prompt is weighted once: its loss is the mean over its valid
pairs, exactly like the reward model's K-wise loss, so ``loss_sum / count`` is a mean over prompts and a
prompt with many responses does not outweigh one with two. Each response's log-prob is computed once (one
policy and one reference forward over the B*K responses), whatever the number of pairs.

Options (``OBJECTIVE``): ``beta``, ``label_smoothing`` (> 0: conservative DPO, the assumed probability
that a preference label is flipped). Roles: the trained policy (``ctx.model_cfg``)
and the frozen reference ``ctx.frozen_params('ref')`` with config ``ctx.cfg_of('ref')``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.losses.logprobs import sequence_logprobs
from gptjax.losses.objective import Objective
from gptjax.losses.ranking import pair_mask, pair_metrics, per_prompt_mean


def dpo_loss(
    pi_chosen_B: jax.Array,
    pi_rejected_B: jax.Array,
    ref_chosen_B: jax.Array,
    ref_rejected_B: jax.Array,
    beta: float,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """losses_B = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) from summed response log-probs.

    With label_smoothing eps: (1 - eps) * that + eps * the same loss with chosen and rejected swapped.
    Inputs broadcast, so [B, K, 1] against [B, 1, K] scores every pair of a ranking at once.
    """
    x_B = beta * ((pi_chosen_B - ref_chosen_B) - (pi_rejected_B - ref_rejected_B))
    losses_B = -jax.nn.log_sigmoid(x_B)
    if label_smoothing:
        losses_B = (1.0 - label_smoothing) * losses_B - label_smoothing * jax.nn.log_sigmoid(-x_B)
    return losses_B


def loss_fn(params, batch: dict, rng: jax.Array, ctx) -> tuple[jax.Array, dict]:
    """DPO over all valid pairs of each ranking, mean per prompt, summed over prompts; metrics (sum, count).

    Implicit reward = beta * (log pi - log ref) of a response. accuracy counts pairs whose chosen reward is
    strictly above the rejected one (a tie, e.g. policy == ref at the start, is not correct).
    """
    opts = OBJECTIVE.options_of(ctx.loss_cfg)
    beta, label_smoothing = opts.beta, opts.label_smoothing
    seq = (batch["tokens_BKL"], batch["prompt_lengths_BK"], batch["lengths_BK"])
    valid_BK = batch["valid_BK"]

    dropout = rng if getattr(ctx.model_cfg, "lora_dropout", 0.0) > 0 else None
    pi_BK = sequence_logprobs(ctx.model_cfg, params, *seq, dropout_rng=dropout)
    ref_BK = jax.lax.stop_gradient(sequence_logprobs(ctx.cfg_of("ref"), ctx.frozen_params("ref"), *seq))
    pi_BK = jnp.where(valid_BK, pi_BK, 0.0)
    ref_BK = jnp.where(valid_BK, ref_BK, 0.0)

    # Row i = chosen (ranked better), column j = rejected; pair_mask keeps i < j with both valid.
    pairs_BKK = pair_mask(valid_BK)
    pi_c, pi_r = pi_BK[..., :, None], pi_BK[..., None, :]
    ref_c, ref_r = ref_BK[..., :, None], ref_BK[..., None, :]
    losses_BKK = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, label_smoothing)
    loss_sum, count = per_prompt_mean(losses_BKK, pairs_BKK)

    metrics = {"loss": (loss_sum, count), **pair_metrics(beta * (pi_BK - ref_BK), valid_BK)}
    return loss_sum, metrics


OBJECTIVE = Objective(
    loss_fn=loss_fn, data=("rm",), frozen=("ref",), options={"beta": 0.1, "label_smoothing": 0.0}
)
