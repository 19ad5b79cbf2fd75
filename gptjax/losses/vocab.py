"""Per-token terms of an LM head (log p(target), entropy, argmax hit) without the whole [B, L, V] logits.

With a large vocabulary the fp32 logits of a batch dwarf everything else (LLaMA-3's 128k vocabulary at
256 x 4096 tokens: 512 GB). ``head_terms`` takes the model's final-normed features and the head matrix
(``model.apply(..., head=False)``, ``model.lm_head_weight``) and computes the logits one sequence chunk at
a time under ``jax.lax.scan``; the chunk body is rematerialised, so the backward pass recomputes each
chunk's logits instead of keeping them. Peak memory is one chunk's logits (``ModelConfig.logits_chunk_mb``)
and the values and gradients are those of the one-block computation. When the logits fit in the budget
the whole sequence is one chunk and nothing is scanned.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from gptjax import model


def chunk_len(batch: int, seq_len: int, vocab: int, budget_mb: float) -> int:
    """Positions per chunk: the most whose fp32 logits for the whole batch fit ``budget_mb`` MiB (>= 1)."""
    per_position = batch * vocab * 4
    return max(1, min(seq_len, int(budget_mb * 2**20 // per_position)))


def _terms_of_logits(logits_BCV, targets_BC, temperature, scaled: bool, entropy: bool):
    if scaled:
        logits_BCV = logits_BCV / temperature
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    target_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
    out = {"logp": target_BC - lse_BC}
    if entropy:  # H = -sum(p log p)
        logp_BCV = logits_BCV - lse_BC[..., None]
        out["entropy"] = -jnp.sum(jnp.exp(logp_BCV) * logp_BCV, axis=-1)
    return out


def _raw_logits(f_BCD, w_DV):
    return jnp.einsum("bcd,dv->bcv", f_BCD, w_DV, preferred_element_type=jnp.float32)


def _cap(logits_BCV, softcap: float):
    """The final soft-cap c * tanh(logits / c) (Gemma 2); 0: none."""
    return logits_BCV if not softcap else softcap * jnp.tanh(logits_BCV / softcap)


def _chunked_forward(f_NBCD, w_DV, t_NBC, temperature, scaled, entropy, softcap):
    """Terms and argmax hits of every chunk, [N, B, C] each; ``w_DV`` already in the features' dtype."""

    def chunk(_, xs):
        f_BCD, t_BC = xs
        logits_BCV = _cap(_raw_logits(f_BCD, w_DV), softcap)
        out = _terms_of_logits(logits_BCV, t_BC, temperature, scaled, entropy)
        out["hit"] = (jnp.argmax(logits_BCV, axis=-1) == t_BC).astype(jnp.float32)
        return None, out

    return jax.lax.scan(chunk, None, (f_NBCD, t_NBC))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked(f_NBCD, w_DV, t_NBC, temperature, scaled: bool, entropy: bool, softcap: float):
    return _chunked_forward(f_NBCD, w_DV.astype(f_NBCD.dtype), t_NBC, temperature, scaled, entropy, softcap)


def _chunked_fwd(f_NBCD, w_DV, t_NBC, temperature, scaled, entropy, softcap):
    w_c = w_DV.astype(f_NBCD.dtype)  # once, not per chunk
    out = _chunked_forward(f_NBCD, w_c, t_NBC, temperature, scaled, entropy, softcap)
    return out, (f_NBCD, w_c, t_NBC, temperature, jnp.zeros((0,), w_DV.dtype))


def _chunked_bwd(scaled, entropy, softcap, res, ct):
    """Each chunk's logits recomputed; the logits' cotangent meets the matmuls in the features' dtype (bf16
    products on an accelerator, not fp32 ones), and the head's gradient is summed over chunks in fp32, then
    returned in w's dtype."""
    f_NBCD, w_c, t_NBC, temperature, w_like = res

    def chunk(dw_DV, xs):
        f_BCD, t_BC, ct_chunk = xs
        raw_BCV = _raw_logits(f_BCD, w_c)
        terms = lambda lg: _terms_of_logits(_cap(lg, softcap), t_BC, temperature, scaled, entropy)
        _, vjp = jax.vjp(terms, raw_BCV)
        (g_BCV,) = vjp({k: ct_chunk[k] for k in ("logp", "entropy") if k in ct_chunk})
        g_BCV = g_BCV.astype(f_BCD.dtype)
        df_BCD = jnp.einsum("bcv,dv->bcd", g_BCV, w_c, preferred_element_type=jnp.float32)
        dw_DV = dw_DV + jnp.einsum("bcd,bcv->dv", f_BCD, g_BCV, preferred_element_type=jnp.float32)
        return dw_DV, df_BCD.astype(f_BCD.dtype)

    cts = {k: v for k, v in ct.items() if k != "hit"}
    dw_DV, df_NBCD = jax.lax.scan(chunk, jnp.zeros(w_c.shape, jnp.float32), (f_NBCD, t_NBC, cts))
    return df_NBCD, dw_DV.astype(w_like.dtype), None, jnp.zeros_like(temperature)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def head_terms(
    features_BLD: jax.Array,
    w_DV: jax.Array,
    targets_BL: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    entropy: bool = False,
    budget_mb: float = 256.0,
    softcap: float = 0.0,
) -> dict[str, jax.Array]:
    """{'logp': log p(target), 'hit': argmax == target (no gradient), 'entropy' if asked}, each [B, L] fp32.

    The logits are ``features @ w`` (with ``softcap`` > 0: c * tanh(that / c), Gemma 2's final cap), over
    ``temperature``, in fp32 (the product in the features' dtype with fp32
    accumulation); they are built ``chunk_len`` positions at a time (the sequence is zero-padded to a whole
    number of chunks and the padding dropped from the outputs). The backward pass (a custom VJP) recomputes
    each chunk's logits, casts their cotangent to the features' dtype for the two products (as mixed
    precision does for any matmul) and accumulates the head's gradient in fp32. No gradient flows to
    ``temperature``. Leading dims of ``features`` beyond one batch axis are not supported: flatten them first.
    """
    B, L, D = features_BLD.shape
    C = chunk_len(B, L, w_DV.shape[1], budget_mb)
    n = math.ceil(L / C)
    pad = n * C - L
    f_NBCD = jnp.pad(features_BLD, ((0, 0), (0, pad), (0, 0))).reshape(B, n, C, D).transpose(1, 0, 2, 3)
    t_NBC = jnp.pad(targets_BL, ((0, 0), (0, pad))).reshape(B, n, C).transpose(1, 0, 2)
    scaled = not (isinstance(temperature, (int, float)) and temperature == 1.0)  # may be traced
    temp = jnp.asarray(temperature, jnp.float32)
    out_N = _chunked(f_NBCD, w_DV, t_NBC, temp, scaled, entropy, float(softcap))
    out_N["hit"] = jax.lax.stop_gradient(out_N["hit"])
    return {k: v.transpose(1, 0, 2).reshape(B, n * C)[:, :L] for k, v in out_N.items()}


def lm_terms(
    cfg: model.ModelConfig,
    params,
    tokens_BL: jax.Array,
    targets_BL: jax.Array,
    positions_BL: jax.Array | None = None,
    segment_ids_BL: jax.Array | None = None,
    *,
    temperature: float | jax.Array = 1.0,
    entropy: bool = False,
    dropout_rng: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """``model_head_terms`` of the model's predictions for ``tokens`` against ``targets`` (same positions)."""
    kwargs = {"dropout_rng": dropout_rng} if dropout_rng is not None else {}
    features_BLD = model.apply(cfg, params, tokens_BL, positions_BL, segment_ids_BL, head=False, **kwargs)
    return model_head_terms(cfg, params, features_BLD, targets_BL, temperature=temperature, entropy=entropy)


def model_head_terms(
    cfg: model.ModelConfig,
    params,
    features_BLD: jax.Array,
    targets_BL: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    entropy: bool = False,
) -> dict[str, jax.Array]:
    """``head_terms`` with the model's LM head and its config's chunk budget (``cfg.logits_chunk_mb``)."""
    return head_terms(
        features_BLD,
        model.lm_head_weight(cfg, params, capped=True),
        targets_BL,
        temperature=temperature,
        entropy=entropy,
        budget_mb=cfg.logits_chunk_mb,
        softcap=cfg.final_softcap,
    )
