"""Streaming generation: one prompt, one token at a time (chat), with the same sampling as ``sample.generate``
(greedy, temperature, top-k, top-p) and its KV cache, so a streamed answer equals a generated one.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import model as model_lib
from gptjax.model.sample import Params, _prefill, _sample, check_lengths


@functools.partial(
    jax.jit, static_argnames=("cfg", "cache_len", "greedy", "top_k", "use_top_p", "cache_dtype")
)
def _stream_prefill(
    cfg,
    params,
    prompt_1P,
    length,
    rng,
    temperature,
    top_p,
    *,
    cache_len,
    greedy,
    top_k,
    use_top_p,
    cache_dtype,
):
    """The first token (key ``fold_in(rng, 0)``, as in ``_generate``) and the cache holding the prompt."""
    P = prompt_1P.shape[1]
    cache = model_lib.init_cache(cfg, 1, cache_len, dtype=cache_dtype)
    positions_1P = jnp.arange(P, dtype=jnp.int32)[None]
    logits_1V, cache = _prefill(cfg, params, prompt_1P, positions_1P, length[None], cache)
    opts = dict(greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    token_1, _ = _sample(logits_1V, jax.random.fold_in(rng, 0), temperature, top_p, **opts)
    return token_1, cache


@functools.partial(
    jax.jit, static_argnames=("cfg", "greedy", "top_k", "use_top_p"), donate_argnames=("cache",)
)
def _stream_step(cfg, params, token_1, pos, t, cache, rng, temperature, top_p, *, greedy, top_k, use_top_p):
    """Feed the previous token at slot ``pos``, then sample token t (key ``fold_in(rng, t)``)."""
    logits_11V, cache = model_lib.decode(cfg, params, token_1[:, None], pos.reshape(1, 1), cache)
    opts = dict(greedy=greedy, top_k=top_k, use_top_p=use_top_p)
    token_1, _ = _sample(logits_11V[:, 0], jax.random.fold_in(rng, t), temperature, top_p, **opts)
    return token_1, cache


_unstack_layers = jax.jit(model_lib.unstack_layers, static_argnums=0)


def stream(
    cfg: model_lib.ModelConfig,
    params: Params,
    prompt_P: Any,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    cache_dtype: str | None = None,
) -> Iterator[int]:
    """Yield the tokens sampled after one unpadded prompt as ints, one at a time, EOS included (then stop).

    The same tokens as ``generate`` on that prompt alone (same sampling options and rng): a jitted prefill,
    then one jitted decode step per token. The prompt is padded to a power-of-two bucket so that the turns
    of a chat reuse a few compiled shapes (the pad slots are overwritten before they are read). For unrolled
    layers (``cfg.scan`` False) pass ``model.unstack_layers(cfg, params)`` to slice the layers once, not
    once per call. Arguments are checked when called, not at the first ``next``.
    """
    if cfg.head != "lm":
        raise ValueError(f"stream needs an LM head, but cfg.head={cfg.head!r} (a scalar-head model scores)")
    prompt = np.asarray(prompt_P, np.int32)
    if prompt.ndim != 1 or prompt.size < 1:
        raise ValueError(f"prompt_P must be a non-empty 1-D token list, got shape {prompt.shape}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    P, T = prompt.size, int(max_new_tokens)
    check_lengths(cfg, P, T)
    temperature, top_p, top_k = float(temperature), float(top_p), int(top_k)
    if temperature < 0 or not 0.0 < top_p <= 1.0 or not 0 <= top_k <= cfg.vocab_size:
        raise ValueError(
            f"temperature={temperature} must be >= 0, top_p={top_p} in (0, 1], top_k={top_k} in "
            f"[0, {cfg.vocab_size}]"
        )
    if eos_id is not None and not 0 <= int(eos_id) < cfg.vocab_size:
        raise ValueError(f"eos_id={eos_id} is outside the model's vocabulary [0, {cfg.vocab_size})")
    if not cfg.scan and not isinstance(params["blocks"], tuple):
        params = _unstack_layers(cfg, params)
    bucket = max(P, min(1 << (P - 1).bit_length(), cfg.max_len - T))
    prompt_1P = np.pad(prompt, (0, bucket - P))[None]
    greedy = temperature == 0.0
    opts = dict(greedy=greedy, top_k=0 if greedy else top_k, use_top_p=not greedy and top_p < 1.0)
    scalars = (jnp.float32(temperature or 1.0), jnp.float32(top_p))

    def tokens():
        token_1, cache = _stream_prefill(
            cfg, params, prompt_1P, jnp.int32(P), rng, *scalars,
            cache_len=bucket + T, cache_dtype=cache_dtype, **opts,
        )  # fmt: skip
        for t in range(1, T + 1):
            if t < T:  # dispatched before token t - 1 reaches the host: the device works while it is printed
                next_1, cache = _stream_step(
                    cfg, params, token_1, jnp.int32(P + t - 1), jnp.int32(t), cache, rng, *scalars, **opts
                )
            token = int(token_1[0])
            yield token
            if token == eos_id:
                return
            token_1 = next_1

    return tokens()
