"""Log-probs of responses under an LM: per token (PPO, KL penalties) and summed per sequence (DPO).

Sequences are laid out as the 'rm' batches are: ``BOS prompt response EOS``, right-padded, with
``prompt_lengths`` (BOS + prompt) and ``lengths`` (real tokens). The response is positions
``prompt_length .. length - 1`` (its EOS included). Leading dimensions are free: ``[B, K, L]`` rankings and
``[B, L]`` rollouts both work; the model sees them flattened to one batch, so each sequence runs once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax import model
from gptjax.losses.lm import token_logprobs


def response_mask(prompt_lengths_BK: jax.Array, lengths_BK: jax.Array, seq_len: int) -> jax.Array:
    """bool [..., L]: True at response positions prompt_length <= t < length."""
    t_L = jnp.arange(seq_len)
    return (t_L >= prompt_lengths_BK[..., None]) & (t_L < lengths_BK[..., None])


def forward(cfg, params, tokens_BKL: jax.Array, dropout_rng: jax.Array | None = None) -> jax.Array:
    """model.apply over [..., L] tokens flattened to [N, L]; the output gets the leading dims back."""
    lead, L = tokens_BKL.shape[:-1], tokens_BKL.shape[-1]
    kwargs = {"dropout_rng": dropout_rng} if dropout_rng is not None else {}
    out = model.apply(cfg, params, tokens_BKL.reshape(-1, L), **kwargs)
    return out.reshape(*lead, *out.shape[1:])


def response_logprobs(
    cfg,
    params,
    tokens_BKL: jax.Array,
    prompt_lengths_BK: jax.Array,
    lengths_BK: jax.Array,
    *,
    temperature: float = 1.0,
    dropout_rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(logp_BKL, mask_BKL): logp[..., t] = log p(token_t | tokens_<t) in fp32 (0 at t = 0 and off the mask).

    Aligned with the tokens, so ``logp * mask`` sums to the response's log-prob. ``temperature`` divides the
    logits first (PPO scores responses with the temperature it sampled them at).
    """
    L = tokens_BKL.shape[-1]
    logits_BKLV = forward(cfg, params, tokens_BKL, dropout_rng)
    if not (isinstance(temperature, (int, float)) and temperature == 1.0):  # may be traced
        logits_BKLV = logits_BKLV / temperature
    # Logits at t - 1 predict token t; position 0 (BOS) has no prediction.
    logp_BKL = token_logprobs(logits_BKLV[..., :-1, :], tokens_BKL[..., 1:])
    logp_BKL = jnp.concatenate([jnp.zeros_like(logp_BKL[..., :1]), logp_BKL], axis=-1)
    mask_BKL = response_mask(prompt_lengths_BK, lengths_BK, L) & (jnp.arange(L) >= 1)
    return jnp.where(mask_BKL, logp_BKL, 0.0), mask_BKL


def sequence_logprobs(
    cfg,
    params,
    tokens_BKL: jax.Array,
    prompt_lengths_BK: jax.Array,
    lengths_BK: jax.Array,
    *,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """logp_BK: log p(response | prompt), summed over the response tokens and its EOS, fp32; 0 if empty."""
    logp_BKL, _ = response_logprobs(
        cfg, params, tokens_BKL, prompt_lengths_BK, lengths_BK, dropout_rng=dropout_rng
    )
    return jnp.sum(logp_BKL, axis=-1)
