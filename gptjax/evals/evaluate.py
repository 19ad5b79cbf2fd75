"""Sampling policies on held-out prompts and scoring the samples (gold reward, reward-model score, KL), and
held-out text loss: the computations the evaluators (``gptjax.evals.gold``, ``kl``, ...) are made of."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from gptjax import data, model
from gptjax.losses import lm
from gptjax.losses import logprobs as logprobs_lib
from gptjax.losses.ctx import Ctx, full_params
from gptjax.model.sample_text import sample_batches

GoldFn = Callable[..., float]  # gold(prompt, response, finished=bool) -> float


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
    """Mean gold reward, EOS rate and mean length of sampled responses (one per prompt); ``per_prompt``: each
    prompt's gold reward (for pairing); a few samples for the report."""
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
        "per_prompt": [float(r) for r in rewards],
        "samples": samples,
    }


_seq_logprobs = jax.jit(
    lambda cfg, params, tokens, plen, lens, temperature: jax.numpy.sum(
        logprobs_lib.response_logprobs(cfg, params, tokens, plen, lens, temperature=temperature)[0], axis=-1
    ),
    static_argnums=0,
)


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
            gold_reward_se=standard_error(per_prompt),
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
        res["kl_to_ref_se"] = standard_error(np.reshape(kls, (len(prompts), samples_per_prompt)).mean(axis=1))
    if reward_fn is not None:
        res["rm_reward_mean"] = float(
            np.mean(np.concatenate(reward_fn([(p, [x]) for p, x in zip(rep, texts, strict=True)])))
        )
    return res


def standard_error(per_prompt: np.ndarray) -> float:
    """Standard error of the mean over prompts (0 for one prompt)."""
    n = len(per_prompt)
    return float(np.std(per_prompt, ddof=1) / np.sqrt(n)) if n > 1 else 0.0


@jax.jit
def _lm_eval_step(params, batch, rng, ctx):
    """The LM loss's (sum, count) metrics of one batch (what the train step's eval step computes)."""
    return lm.loss_fn(full_params(params, ctx), batch, rng, ctx)[1]


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
    it = data.make_iterator(
        data_cfg, stage="pretrain", batch_size=batch_size, seq_len=seq_len, seed=0, split="validation"
    )
    ctx = Ctx(model_cfg=cfg)
    totals = None
    for i in range(batches):
        m = _lm_eval_step(params, next(it), jax.random.key(i), ctx)
        totals = m if totals is None else jax.tree.map(np.add, totals, m)
    loss, tokens = (float(v) for v in totals["loss"])
    accuracy = float(totals["accuracy"][0]) / tokens
    return {"text_loss": loss / tokens, "text_accuracy": accuracy, "text_tokens": tokens}


def paired_difference(a: dict, b: dict) -> tuple[float, float]:
    """(mean of a - b, its standard error), paired by prompt (``compare_policies``' per_prompt)."""
    d = np.asarray(a["per_prompt"]) - np.asarray(b["per_prompt"])
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
