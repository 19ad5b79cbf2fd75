"""Jitted generation with a KV cache: greedy, temperature, top-k, top-p (nucleus) and EOS handling.

    tokens_BT = generate(cfg, params, prompts_BP, rng, max_new_tokens=32, temperature=0.7, eos_id=2)
    out = generate(..., return_info=True)      # Generation: tokens_BT, logprobs_BT, mask_BT, lengths_B, ...
    for token in stream(cfg, params, prompt_P, rng, max_new_tokens=32, eos_id=2): ...   # one at a time

Prompts are right-padded to P with per-row ``prompt_lengths_B``. One ``model.decode`` call prefills all P
slots; row b then writes its first new token at slot ``prompt_lengths_B[b]``, overwriting the pad slots it
wrote during prefill (the cache attention only reads slots up to a row's own position). The rest runs one
token per row per step inside a ``jax.lax.while_loop`` that stops once every row has emitted EOS.

Log-probs follow the PPO convention: ``log_softmax(logits / temperature)`` at the sampled token, taken
before top-k / top-p truncation, so they match what a full forward pass of the policy computes.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gptjax import model as model_lib
from gptjax.model import qleaf

Params = dict[str, Any]


class Generation(NamedTuple):
    """What ``generate(..., return_info=True)`` returns (a pytree, so it can leave a jitted function)."""

    tokens_BT: jax.Array  # sampled tokens; pad_id after a row's EOS and after the loop stopped early
    logprobs_BT: jax.Array  # log p(token) under the temperature-scaled, untruncated distribution; 0 off-mask
    mask_BT: jax.Array  # 1 for generated tokens up to and including EOS
    lengths_B: jax.Array  # number of generated tokens per row (EOS included)
    ended_B: jax.Array  # True where the row emitted eos_id
    steps: jax.Array  # tokens sampled per row (< max_new_tokens when every row ended early)


# ----------------------------------------------------------------------------------------------------
# Logit filters (pure; filtered-out entries become -inf)


def top_k_filter(logits_BV: jax.Array, k: int) -> jax.Array:
    """Keep exactly the k largest logits of each row (ties broken by lower index, like argmax)."""
    _, idx_BK = jax.lax.top_k(logits_BV, k)
    rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
    keep_BV = jnp.zeros(logits_BV.shape, bool).at[rows_B1, idx_BK].set(True)
    return jnp.where(keep_BV, logits_BV, -jnp.inf)


def top_p_filter(logits_BV: jax.Array, p: float | jax.Array) -> jax.Array:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass is >= p.

    A token is kept when the mass of the tokens ranked strictly above it is < p, so the top token is always
    kept and the set stops at the first token that brings the running mass to p.
    """
    order_BV = jnp.argsort(-logits_BV, axis=-1, stable=True)
    sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_above_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    keep_sorted_BV = (mass_above_BV < p).at[:, 0].set(True)
    rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
    keep_BV = jnp.zeros(logits_BV.shape, bool).at[rows_B1, order_BV].set(keep_sorted_BV)
    return jnp.where(keep_BV, logits_BV, -jnp.inf)


def _sample(logits_BV, key, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    """One token per row and its log-prob (temperature-scaled, before truncation; T=1 when greedy)."""
    logits_BV = logits_BV.astype(jnp.float32)
    if greedy:
        token_B = jnp.argmax(logits_BV, axis=-1)
        scaled_BV = logits_BV
    else:
        scaled_BV = logits_BV / temperature
        filtered_BV = scaled_BV
        if top_k:
            filtered_BV = top_k_filter(filtered_BV, top_k)
        if use_top_p:  # after top-k: the nucleus is taken from the renormalised top-k distribution
            filtered_BV = top_p_filter(filtered_BV, top_p)
        token_B = jax.random.categorical(key, filtered_BV, axis=-1)
    logp_BV = jax.nn.log_softmax(scaled_BV, axis=-1)
    logp_B = jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
    return token_B.astype(jnp.int32), logp_B


# ----------------------------------------------------------------------------------------------------
# The jitted loop


def _prefill(cfg, params, prompts_BP, positions_BP, prompt_lengths_B, cache):
    """Logits at each row's last prompt token, and the cache with all P slots written.

    The prompt fills slots 0..P-1 (``prefill``: attention as in training, no scores against all slots). Only
    the last prompt position of each row is projected to logits (``logits_at_B``): the [B, P, V] logits of
    the whole prompt would dwarf the KV cache at a 128k vocabulary.
    """
    last_B = prompt_lengths_B - 1
    logits_B1V, cache = model_lib.decode(
        cfg, params, prompts_BP, positions_BP, cache, logits_at_B=last_B, prefill=True
    )
    return logits_B1V[:, 0], cache


def decode_params(cfg, params):
    """Params for a decode loop: per-layer trees (``model.unstack_layers``) whose weight matrices and tables
    are already in the compute dtype. The model casts each of them at use (norm scales, biases and the
    scalar head stay as they are), so the outputs are the same, and a token reads bf16 weights once instead
    of fp32 ones plus a cast."""
    return cast_to_compute_dtype(cfg, model_lib.unstack_layers(cfg, params))


def cast_to_compute_dtype(cfg, params):
    """Weight matrices and tables in ``cfg.dtype``; norm scales, biases and scalars as they are (what the
    model casts at use, so its outputs are unchanged). Stacked layers (a leading layer axis) or per-layer
    trees (``model.unstack_layers``) alike."""
    dt = jnp.dtype(cfg.dtype)

    def cast(a, matrix_ndim):
        if qleaf.is_quantized(a):  # a quantised base's weights: dequantised at use, scales kept exact
            return a
        return a.astype(dt) if a.ndim >= matrix_ndim and jnp.issubdtype(a.dtype, jnp.floating) else a

    q = qleaf.is_quantized
    stacked = not isinstance(params["blocks"], tuple)
    out = {k: jax.tree.map(lambda a: cast(a, 2), v, is_leaf=q) for k, v in params.items() if k != "blocks"}
    out["blocks"] = jax.tree.map(lambda a: cast(a, 3 if stacked else 2), params["blocks"], is_leaf=q)
    return out


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "max_new_tokens", "greedy", "top_k", "use_top_p", "cache_dtype"),
)
def _generate(
    cfg,
    params,
    prompts_BP,
    prompt_lengths_B,
    rng,
    temperature,
    top_p,
    eos_id,
    pad_id,
    *,
    max_new_tokens: int,
    greedy: bool,
    top_k: int,
    use_top_p: bool,
    cache_dtype,
):
    """eos_id < 0 means no EOS (sampled tokens are >= 0, so it never matches)."""
    B, P = prompts_BP.shape
    T = max_new_tokens
    sample = functools.partial(
        _sample, temperature=temperature, top_p=top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p
    )
    prompt_lengths_B = prompt_lengths_B.astype(jnp.int32)
    # Layers unrolled, one cache buffer per layer: the attention (a Pallas kernel among others) then reads
    # its layer's cache in place, where a slice of a stacked [N, ...] cache is a copy of that layer's
    # cache per token (the whole cache copied every step). Weights sliced and cast once, not per token.
    # A quantised base (QLoRA) keeps its layers scanned: each layer's weights are dequantised inside the
    # layer loop, where unrolled layers would let the compiler dequantise all of them once, up front (a
    # dense copy of the model).
    quantized = qleaf.has_quantized(params)
    if quantized:
        cfg = cfg.replace(scan_layers=True)
        params = cast_to_compute_dtype(cfg, params)
    else:
        cfg = cfg.replace(scan_layers=False)
        params = decode_params(cfg, params)

    cache = model_lib.init_cache(cfg, B, P + T, dtype=cache_dtype)
    positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    last_logits_BV, cache = _prefill(
        cfg, params, prompts_BP.astype(jnp.int32), positions_BP, prompt_lengths_B, cache
    )

    def record(state, t, token_B, logp_B):
        """Write step t's token (pad for rows already done) and update done flags."""
        tokens_BT, logprobs_BT, done_B = state
        live_B = ~done_B
        token_B = jnp.where(live_B, token_B, pad_id)
        tokens_BT = tokens_BT.at[:, t].set(token_B)
        logprobs_BT = logprobs_BT.at[:, t].set(jnp.where(live_B, logp_B, 0.0))
        done_B = done_B | (token_B == eos_id)
        return tokens_BT, logprobs_BT, done_B

    state = (jnp.full((B, T), pad_id, jnp.int32), jnp.zeros((B, T), jnp.float32), jnp.zeros((B,), bool))
    token_B, logp_B = sample(last_logits_BV, jax.random.fold_in(rng, 0))
    state = record(state, 0, token_B, logp_B)

    def cond(carry):
        t, _, _, (_, _, done_B) = carry
        return (t < T) & ~jnp.all(done_B)

    def body(carry):
        # Feed token t-1 at slot prompt_length + t-1, then sample token t.
        t, cache, prev_B, state = carry
        pos_B1 = (prompt_lengths_B + t - 1)[:, None]
        logits_B1V, cache = model_lib.decode(cfg, params, prev_B[:, None], pos_B1, cache)
        token_B, logp_B = sample(logits_B1V[:, 0], jax.random.fold_in(rng, t))
        state = record(state, t, token_B, logp_B)
        return t + 1, cache, state[0][:, t], state

    steps, _, _, (tokens_BT, logprobs_BT, _) = jax.lax.while_loop(
        cond, body, (jnp.int32(1), cache, state[0][:, 0], state)
    )
    is_eos_BT = tokens_BT == eos_id
    ended_B = jnp.any(is_eos_BT, axis=1)
    lengths_B = jnp.where(ended_B, jnp.argmax(is_eos_BT, axis=1) + 1, T).astype(jnp.int32)
    mask_BT = (jnp.arange(T)[None, :] < lengths_B[:, None]).astype(jnp.int32)
    return Generation(tokens_BT, logprobs_BT, mask_BT, lengths_B, ended_B, steps)


# ----------------------------------------------------------------------------------------------------
# Public API


def _host_value(x) -> np.ndarray | None:
    """x as numpy when it can be read without a trace or a cross-host fetch; None otherwise."""
    try:  # a tracer raises on both
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return None
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_lengths(cfg: model_lib.ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    """Raise unless a P-slot prompt plus ``max_new_tokens`` fits the model's context."""
    if prompt_len > cfg.max_len:
        raise ValueError(
            f"prompts are {prompt_len} tokens long but the model's context is max_len={cfg.max_len}; "
            "shorten the prompts (they are never truncated here)"
        )
    total = prompt_len + max_new_tokens
    if total > cfg.max_len:
        msg = (
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} = {total} exceeds the model's "
            f"max_len={cfg.max_len}"
        )
        if cfg.pos == "learned":
            raise ValueError(
                f"{msg}; learned positions stop there: lower max_new_tokens or shorten the prompts"
            )
        logging.warning("%s; rotary positions past max_len were never trained", msg)


def generate(
    cfg: model_lib.ModelConfig,
    params: Params,
    prompts_BP: jax.Array,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    prompt_lengths_B: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    cache_dtype: str | None = None,
    return_info: bool = False,
) -> jax.Array | Generation:
    """Sample ``max_new_tokens`` per row after right-padded ``prompts_BP`` (lengths ``prompt_lengths_B``).

    temperature 0 = greedy (argmax); otherwise logits / temperature, then top-k (0 = off), then top-p
    (1.0 = off). A row that emits ``eos_id`` is done: its later tokens are ``pad_id``; the loop stops when all
    rows are done. Returns tokens_BT, or with ``return_info`` a ``Generation`` that adds the sampled tokens'
    log-probs (``log_softmax(logits / temperature)``, before top-k/top-p truncation: the PPO convention;
    temperature 1 when greedy), the response mask, lengths and whether each row emitted EOS.

    cfg, max_new_tokens, top_k, cache_dtype and the greedy / top-p switches are compile-time constants;
    temperature, top_p, eos_id and pad_id values are not. Params and prompts may be sharded, and this also
    runs inside an outer jit (prompt lengths are then trusted: they must lie in [1, P]).
    """
    if cfg.head != "lm":
        raise ValueError(
            f"generate needs an LM head, but cfg.head={cfg.head!r} (a scalar-head model scores "
            "sequences; it cannot sample them)"
        )
    if np.ndim(prompts_BP) != 2:
        raise ValueError(f"prompts_BP must be [batch, prompt_len], got shape {np.shape(prompts_BP)}")
    B, P = np.shape(prompts_BP)
    if P < 1:
        raise ValueError("prompts_BP has zero length: every row needs at least one prompt token (e.g. BOS)")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    check_lengths(cfg, P, int(max_new_tokens))
    temperature, top_p, top_k = float(temperature), float(top_p), int(top_k)
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = off)")
    if not 0 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k={top_k} must be in [0, vocab_size={cfg.vocab_size}] (0 = off)")
    for name, i in (("eos_id", eos_id), ("pad_id", pad_id)):
        if i is not None and not 0 <= int(i) < cfg.vocab_size:
            raise ValueError(f"{name}={i} is outside the model's vocabulary [0, {cfg.vocab_size})")
    if prompt_lengths_B is None:
        prompt_lengths_B = jnp.full((B,), P, jnp.int32)
    else:
        if np.shape(prompt_lengths_B) != (B,):
            raise ValueError(f"prompt_lengths_B has shape {np.shape(prompt_lengths_B)}, expected ({B},)")
        lengths = _host_value(prompt_lengths_B)
        if lengths is not None and (lengths.min() < 1 or lengths.max() > P):
            bad = int(np.flatnonzero((lengths < 1) | (lengths > P))[0])
            raise ValueError(
                f"prompt_lengths_B[{bad}]={int(lengths[bad])} is outside [1, {P}] (the padded "
                "prompt length); every row needs at least one prompt token"
            )
    out = _generate(
        cfg,
        params,
        prompts_BP,
        prompt_lengths_B,
        rng,
        jnp.float32(temperature or 1.0),
        jnp.float32(top_p),
        jnp.int32(-1 if eos_id is None else eos_id),
        jnp.int32(pad_id),
        max_new_tokens=int(max_new_tokens),
        greedy=temperature == 0.0,
        top_k=0 if temperature == 0.0 else top_k,
        use_top_p=temperature != 0.0 and top_p < 1.0,
        cache_dtype=cache_dtype,
    )
    return out if return_info else out.tokens_BT


def concat_prompt_response(
    prompts_BP: jax.Array,
    prompt_lengths_B: jax.Array,
    tokens_BT: jax.Array,
    lengths_B: jax.Array,
    pad_id: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Right-padded [B, P + T] rows of prompt then response, and the response mask in that layout.

    Position ``prompt_lengths_B[b] - 1 + t`` of a forward pass over the result predicts response token t.
    """
    P, T = prompts_BP.shape[1], tokens_BT.shape[1]
    idx_1L = jnp.arange(P + T)[None]
    resp_idx_BL = idx_1L - prompt_lengths_B[:, None]
    in_resp_BL = (resp_idx_BL >= 0) & (resp_idx_BL < lengths_B[:, None])
    padded_prompts_BL = jnp.pad(prompts_BP, ((0, 0), (0, T)), constant_values=pad_id)
    from_resp_BL = jnp.take_along_axis(tokens_BT, jnp.clip(resp_idx_BL, 0, T - 1), axis=1)
    tokens_BL = jnp.where(
        resp_idx_BL < 0,
        padded_prompts_BL,
        jnp.where(in_resp_BL, from_resp_BL.astype(prompts_BP.dtype), pad_id),
    )
    return tokens_BL, in_resp_BL.astype(jnp.int32)
