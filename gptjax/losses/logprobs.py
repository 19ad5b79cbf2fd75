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
from gptjax.losses import vocab


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


def next_token_terms(
    cfg,
    params,
    tokens_NL: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    entropy: bool = False,
    dropout_rng: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """``vocab.head_terms`` of each token given the ones before it, aligned with the tokens: [N, L] each,
    0 at position 0 (no prediction). The logits are built in chunks, never [N, L, V] at once."""
    kwargs = {"dropout_rng": dropout_rng} if dropout_rng is not None else {}
    features_NLD = model.apply(cfg, params, tokens_NL, head=False, **kwargs)
    terms = vocab.model_head_terms(
        cfg, params, features_NLD[:, :-1], tokens_NL[:, 1:], temperature=temperature, entropy=entropy
    )
    return {k: jnp.pad(v, ((0, 0), (1, 0))) for k, v in terms.items()}


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
    lead, L = tokens_BKL.shape[:-1], tokens_BKL.shape[-1]
    tokens_NL = tokens_BKL.reshape(-1, L)
    # Features at t - 1 predict token t; position 0 (BOS) has no prediction.
    terms = next_token_terms(cfg, params, tokens_NL, temperature=temperature, dropout_rng=dropout_rng)
    logp_BKL = terms["logp"].reshape(*lead, L)
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
