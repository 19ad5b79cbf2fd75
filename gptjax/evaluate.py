"""Gold-reward evaluation: sample responses to held-out prompts and score them with a programmatic reward."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from gptjax import model, sample

GoldFn = Callable[..., float]  # gold(prompt, response, finished=bool) -> float


def encode_prompts(vocab: Any, prompts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """BOS + prompt, right-padded with PAD: (prompt_BP, prompt_lengths_B). Too long -> error naming it."""
    rows = [[vocab.bos_id, *vocab.encode(p)] for p in prompts]
    too_long = [i for i, r in enumerate(rows) if len(r) > max_len]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"prompt {i} ({prompts[i][:40]!r}...) has {len(rows[i])} tokens, more than {max_len}; "
            f"{len(too_long)} prompt(s) are too long"
        )
    P = max(len(r) for r in rows)
    out = np.full((len(rows), P), vocab.pad_id, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, np.array([len(r) for r in rows], np.int32)


def gold_reward_eval(
    cfg: model.ModelConfig,
    params: Any,
    vocab: Any,
    prompts: Sequence[str],
    gold: GoldFn,
    *,
    rng: jax.Array,
    max_new_tokens: int = 24,
    temperature: float = 0.0,
    batch_size: int = 100,
    keep_samples: int = 8,
) -> dict[str, Any]:
    """Mean gold reward, EOS rate and mean length of sampled responses; a few samples for the report."""
    rewards, ended, lengths, samples = [], [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        prompt_BP, lengths_B = encode_prompts(vocab, chunk, cfg.max_len - max_new_tokens)
        out = sample.generate(
            cfg,
            params,
            prompt_BP,
            jax.random.fold_in(rng, start),
            max_new_tokens=max_new_tokens,
            prompt_lengths_B=lengths_B,
            temperature=temperature,
            eos_id=vocab.eos_id,
            pad_id=vocab.pad_id,
            return_info=True,
        )
        tokens_BT, ended_B, len_B = jax.device_get((out.tokens_BT, out.ended_B, out.lengths_B))
        for p, toks, e, n in zip(chunk, tokens_BT, ended_B, len_B, strict=True):
            text = vocab.decode(toks[:n])
            r = gold(p, text, finished=bool(e))
            rewards.append(r)
            ended.append(bool(e))
            lengths.append(int(n))
            if len(samples) < keep_samples:
                samples.append({"prompt": p, "response": text, "gold_reward": r, "ended": bool(e)})
    return {
        "gold_reward": float(np.mean(rewards)),
        "eos_rate": float(np.mean(ended)),
        "mean_length": float(np.mean(lengths)),
        "n": len(rewards),
        "samples": samples,
    }
