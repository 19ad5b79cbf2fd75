"""Next-token cross-entropy with per-token weights (pretraining; SFT puts weight only on response tokens)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax import model


def token_logprobs(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    """log p(target) per position, in fp32."""
    logp_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BLV, targets_BL[..., None], axis=-1)[..., 0]


def loss_fn(params, batch: dict, rng: jax.Array, ctx) -> tuple[jax.Array, dict]:
    """Sum of weighted next-token NLL; metrics: loss and accuracy per weighted token."""
    dropout = None
    if getattr(ctx.model_cfg, "lora_dropout", 0.0) > 0:
        dropout = rng
    kwargs = {"dropout_rng": dropout} if dropout is not None else {}
    logits_BLV = model.apply(
        ctx.model_cfg,
        params,
        batch["inputs_BL"],
        batch.get("positions_BL"),
        batch.get("segment_ids_BL"),
        **kwargs,
    )
    weights_BL = batch["weights_BL"].astype(jnp.float32)
    nll_BL = -token_logprobs(logits_BLV, batch["targets_BL"])
    count = jnp.sum(weights_BL)
    loss_sum = jnp.sum(nll_BL * weights_BL)
    correct_BL = (jnp.argmax(logits_BLV, -1) == batch["targets_BL"]).astype(jnp.float32)
    return loss_sum, {"loss": (loss_sum, count), "accuracy": (jnp.sum(correct_BL * weights_BL), count)}
