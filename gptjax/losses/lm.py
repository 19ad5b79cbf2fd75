"""Next-token cross-entropy with per-token weights (pretraining; SFT puts weight only on response tokens)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.losses import vocab
from gptjax.losses.objective import Objective


def token_logprobs(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    """log p(target) per position, in fp32, from whole logits (the one-block form of
    ``gptjax.losses.vocab.head_terms``, which the losses use)."""
    logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]


def loss_fn(params, batch: dict, rng: jax.Array, ctx) -> tuple[jax.Array, dict]:
    """Sum of weighted next-token NLL; metrics: loss and accuracy per weighted token.

    The logits are built in sequence chunks (``gptjax.losses.vocab``), never [B, L, V] at once.
    """
    dropout = rng if getattr(ctx.model_cfg, "lora_dropout", 0.0) > 0 else None
    terms = vocab.lm_terms(
        ctx.model_cfg,
        params,
        batch["inputs_BL"],
        batch["targets_BL"],
        batch.get("positions_BL"),
        batch.get("segment_ids_BL"),
        dropout_rng=dropout,
    )
    weights_BL = batch["weights_BL"].astype(jnp.float32)
    count = jnp.sum(weights_BL)
    loss_sum = -jnp.sum(terms["logp"] * weights_BL)
    return loss_sum, {"loss": (loss_sum, count), "accuracy": (jnp.sum(terms["hit"] * weights_BL), count)}


# Pretraining reads packed text, SFT demonstrations (weight on the response tokens only): the same batch keys.
OBJECTIVE = Objective(loss_fn=loss_fn, data=("pretrain", "sft"))
