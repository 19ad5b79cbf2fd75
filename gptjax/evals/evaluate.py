"""Sampling policies on held-out prompts and scoring the samples (gold reward, reward-model score, KL), and
held-out text loss: the computations the evaluators (``gptjax.evals.gold``, ``kl``, ...) are made of."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from gptjax import model

from gptjax.model import sample
from gptjax.losses import logprobs as logprobs_lib

GoldFn = Callable[..., float]  # gold(prompt, response, finished=bool) -> float


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
    batches = sample_batches(cfg, params, vocab, prompts, 1, rng, max_new_tokens, temperature, batch_size)
    for chunk, texts, ended_B, len_B, *_ in batches:
        for p, text, e, n in zip(chunk, texts, ended_B, len_B, strict=True):
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


_seq_logprobs = jax.jit(
    lambda cfg, params, tokens, plen, lens, temperature: jax.numpy.sum(
        logprobs_lib.response_logprobs(cfg, params, tokens, plen, lens, temperature=temperature)[0], axis=-1
    ),
    static_argnums=0,
)


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


def compare_policies(
    policies: dict[str, tuple[model.ModelConfig, Any]],
    vocab: Any,
    prompts: Sequence[str],
    gold: GoldFn,
    *,
    rng: jax.Array,
    ref: tuple[model.ModelConfig, Any] | None = None,
    reward_fn: Callable[[list[tuple[str, list[str]]]], list[np.ndarray]] | None = None,
    samples_per_prompt: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 24,
    batch_size: int = 128,
) -> dict[str, dict[str, float]]:
    """``policy_result`` of each policy: every policy answers the same prompts with the same keys, so
    differences can be paired by prompt (``paired_difference``)."""
    kw = dict(
        ref=ref,
        reward_fn=reward_fn,
        samples_per_prompt=samples_per_prompt,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    return {
        name: policy_result(cfg, params, vocab, prompts, gold, rng=rng, **kw)
        for name, (cfg, params) in policies.items()
    }


def policy_result(
    cfg: model.ModelConfig,
    params: Any,
    vocab: Any,
    prompts: Sequence[str],
    gold: GoldFn | None,
    *,
    rng: jax.Array,
    ref: tuple[model.ModelConfig, Any] | None = None,
    reward_fn: Callable[[list[tuple[str, list[str]]]], list[np.ndarray]] | None = None,
    samples_per_prompt: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 24,
    batch_size: int = 128,
) -> dict[str, Any]:
    """A policy's gold reward on ``samples_per_prompt`` samples of every prompt (mean, and its standard
    error over prompts), the reward model's mean score (``reward_fn``), KL(policy || ref) per response
    (mean of log pi - log ref over the samples, at the sampling temperature, and its standard error over
    prompts), EOS rate and length. ``per_prompt`` holds each prompt's mean gold reward (for pairing).
    """
    rep = [p for p in prompts for _ in range(samples_per_prompt)]
    texts, ended, lengths, kls = [], [], [], []
    batches = sample_batches(
        cfg, params, vocab, prompts, samples_per_prompt, rng, max_new_tokens, temperature, batch_size
    )
    for chunk, t, e, n, tokens_BL, plen_B, len_B in batches:
        texts += t
        ended += list(e)
        lengths += list(n)
        if ref is not None:
            lp = _seq_logprobs(cfg, params, tokens_BL, plen_B, len_B, temperature)
            lr = _seq_logprobs(ref[0], ref[1], tokens_BL, plen_B, len_B, temperature)
            kls += list(np.asarray(lp - lr)[: len(chunk)])
    res: dict[str, Any] = {}
    if gold is not None:
        g = np.array([gold(p, x, finished=bool(e)) for p, x, e in zip(rep, texts, ended, strict=True)])
        per_prompt = g.reshape(len(prompts), samples_per_prompt).mean(axis=1)
        res.update(
            gold_reward_mean=float(g.mean()),
            gold_reward_se=_se(per_prompt),
            per_prompt=per_prompt.tolist(),
            examples=[
                {"prompt": p, "response": x, "gold_reward": float(r)}
                for p, x, r in list(zip(rep, texts, g, strict=True))[
                    : 8 * samples_per_prompt : samples_per_prompt
                ]
            ],
        )
    res.update(eos_rate=float(np.mean(ended)), mean_length=float(np.mean(lengths)), n_samples=len(texts))
    if kls:
        res["kl_to_ref"] = float(np.mean(kls))
        res["kl_to_ref_se"] = _se(np.reshape(kls, (len(prompts), samples_per_prompt)).mean(axis=1))
    if reward_fn is not None:
        res["rm_reward_mean"] = float(
            np.mean(np.concatenate(reward_fn([(p, [x]) for p, x in zip(rep, texts, strict=True)])))
        )
    return res


def _se(per_prompt: np.ndarray) -> float:
    """Standard error of the mean over prompts (0 for one prompt)."""
    n = len(per_prompt)
    return float(np.std(per_prompt, ddof=1) / np.sqrt(n)) if n > 1 else 0.0


@functools.cache
def _lm_eval_step():
    """The jitted LM evaluation step (``step.make_eval_step``), built once per process."""
    from gptjax.train import step as step_lib
    from gptjax.losses import lm

    return step_lib.make_eval_step(lm.loss_fn)


def text_loss(
    cfg: model.ModelConfig,
    params: Any,
    data_cfg: Any,
    *,
    seq_len: int,
    batch_size: int = 32,
    batches: int = 4,
) -> dict[str, float]:
    """A model's next-token loss (nats per token) and accuracy on held-out text: the first ``batches``
    validation batches of a pretraining data section (``data_cfg``), the same batches for every model.

    What PPO-ptx protects: RL moves the policy away from the pretraining distribution (InstructGPT's
    "alignment tax"), and this measures how far, beside the reward the RL buys.
    """
    from gptjax import data
    from gptjax.train import step as step_lib

    it = data.make_iterator(
        data_cfg, stage="pretrain", batch_size=batch_size, seq_len=seq_len, seed=0, split="validation"
    )
    ctx = step_lib.Ctx(model_cfg=cfg)
    totals = None
    for i in range(batches):
        m = _lm_eval_step()(params, next(it), jax.random.key(i), ctx)
        totals = m if totals is None else jax.tree.map(np.add, totals, m)
    loss, tokens = (float(v) for v in totals["loss"])
    accuracy = float(totals["accuracy"][0]) / tokens
    return {"text_loss": loss / tokens, "text_accuracy": accuracy, "text_tokens": tokens}


def paired_difference(a: dict, b: dict) -> tuple[float, float]:
    """(mean of a - b, its standard error), paired by prompt (``compare_policies``' per_prompt)."""
    d = np.asarray(a["per_prompt"]) - np.asarray(b["per_prompt"])
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
