"""Sampling answers to text prompts: encode, generate, decode, in fixed-shape batches (one compilation).

The evaluators (``gptjax.evals``) and best-of-n (``gptjax.rl.bon``) sample through these, so every policy
answers the same prompts with the same keys and differences can be paired by prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from gptjax.model import sample


def encode_prompts(
    vocab: Any, prompts: Sequence[str], max_len: int, pad_to: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_BP, prompt_lengths_B): BOS + prompt, right-padded with PAD to the longest (at least
    ``pad_to``). Too long -> error naming it."""
    rows = [[vocab.bos_id, *vocab.encode(p)] for p in prompts]
    too_long = [i for i, r in enumerate(rows) if len(r) > max_len]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"prompt {i} ({prompts[i][:40]!r}...) has {len(rows[i])} tokens, more than {max_len}; "
            f"{len(too_long)} prompt(s) are too long"
        )
    P = max(pad_to, *(len(r) for r in rows))
    out = np.full((len(rows), P), vocab.pad_id, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, np.array([len(r) for r in rows], np.int32)


def _sample_batch(cfg, params, vocab, prompts, rng, max_new_tokens, temperature, batch_size, pad_to=0):
    """Sampled responses to ``prompts``: (texts, ended, lengths, tokens_BL, prompt_lengths_B, lengths_B).

    A short last batch is padded with repeats to ``batch_size`` rows (and the repeats dropped), so every
    batch has one shape and compiles once."""
    n = len(prompts)
    prompts = list(prompts) + [prompts[-1]] * (batch_size - n)
    prompt_BP, plen_B = encode_prompts(vocab, prompts, cfg.max_len - max_new_tokens, pad_to)
    out = sample.generate(
        cfg,
        params,
        prompt_BP,
        rng,
        max_new_tokens=max_new_tokens,
        prompt_lengths_B=plen_B,
        temperature=temperature,
        eos_id=vocab.eos_id,
        pad_id=vocab.pad_id,
        return_info=True,
    )
    tokens_BT, ended_B, len_B = jax.device_get((out.tokens_BT, out.ended_B, out.lengths_B))
    texts = [vocab.decode(t[:k]) for t, k in zip(tokens_BT[:n], len_B[:n], strict=True)]
    tokens_BL, _ = sample.concat_prompt_response(prompt_BP, plen_B, tokens_BT, len_B, vocab.pad_id)
    return texts, ended_B[:n], len_B[:n], np.asarray(tokens_BL), plen_B, plen_B + len_B


def sample_batches(
    cfg,
    params,
    vocab,
    prompts: Sequence[str],
    n: int,
    rng,
    max_new_tokens: int,
    temperature: float,
    batch_size,
):
    """Sample ``n`` answers to every prompt, prompt-major (prompt 0's n, then prompt 1's ...), ``batch_size``
    rows per call, every batch padded to one prompt shape (one compilation); batch at row ``start`` uses key
    ``fold_in(rng, start)``. Yields (the batch's prompts, texts, ended, lengths, tokens_BL, plen_B, len_B)."""
    rep = [p for p in prompts for _ in range(n)]
    pad_to = max(len(vocab.encode(p)) + 1 for p in prompts)
    for start in range(0, len(rep), batch_size):
        chunk = rep[start : start + batch_size]
        out = _sample_batch(
            cfg,
            params,
            vocab,
            chunk,
            jax.random.fold_in(rng, start),
            max_new_tokens,
            temperature,
            batch_size,
            pad_to,
        )
        yield (chunk, *out)
