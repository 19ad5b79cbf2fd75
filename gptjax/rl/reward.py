"""Reward models after training: normalisation, and evaluation against the labels and a gold reward.

Normalisation (InstructGPT): the bias that makes the SFT demonstrations score mean 0 is folded into the scalar
head's bias, so PPO, best-of-N and chat read normalised rewards with no special code. It runs as the RM
stage's
finishing step (``gptjax.train.stages``) on ``config.normalize.data`` (demonstrations, 'sft' records).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import FrozenConfigDict

from gptjax import checkpoint, data
from gptjax.data import formats, pipeline
from gptjax.data.formats import rm as rm_format
from gptjax.losses import ranking
from gptjax.losses.ctx import Ctx, full_params


def ranked_batch(vocab, rankings: Sequence[tuple[str, Sequence[str]]], seq_len: int, counts=None) -> dict:
    """An 'rm' batch (tokens_BKL, lengths_BK, prompt_lengths_BK, valid_BK) of (prompt, responses) pairs,
    tokenized like the data layer (BOS prompt response EOS); K = the most responses any prompt has."""
    counts = collections.Counter() if counts is None else counts
    items = []
    for prompt, responses in rankings:
        recs = [{"prompt": prompt, "response": r} for r in responses]
        seqs = formats.get("sft").tokenize(recs, vocab, seq_len, "truncate", counts)
        if any(x is None for x in seqs):  # a score must belong to its response: refuse rather than shift
            raise ValueError(
                f"prompt {prompt[:60]!r} leaves no room for a response in {seq_len} tokens: raise "
                "train.seq_len or shorten the prompt"
            )
        items.append(seqs)
    K = max(len(it) for it in items)
    return rm_format.rm_batch(items, list(range(len(items))), K, seq_len, vocab.pad_id)


_rewards = jax.jit(ranking.rewards)  # ctx is a pytree whose static fields are hashable (FrozenConfigDict)


def trained_reward_at(path: str) -> str:
    """How the reward model in ``path`` was trained to score ('last' | 'mean': its run's loss.reward_at);
    'last' for a checkpoint without a run config (e.g. a Hugging Face directory)."""
    try:
        run_config = checkpoint.load_meta(path)[1].get("config") or "{}"
    except (FileNotFoundError, ValueError):
        return "last"
    run_config = json.loads(run_config) if isinstance(run_config, str) else run_config
    return (run_config.get("loss") or {}).get("reward_at") or "last"


def scorer(path: str, vocab, seq_len: int, reward_at: str = "") -> Callable[[list], list[np.ndarray]]:
    """``f(rankings) -> scores`` of the reward model in ``path`` (a workdir or HF directory), scoring as it
    was trained to (``trained_reward_at``) unless ``reward_at`` says otherwise."""
    cfg, params = checkpoint.load_model(path)
    loss_cfg = FrozenConfigDict({"reward_at": reward_at or trained_reward_at(path)})
    ctx = Ctx(model_cfg=cfg, loss_cfg=loss_cfg)
    return lambda rankings: score(ctx, params, vocab, rankings, seq_len)


def score(ctx, params, vocab, rankings, seq_len: int, batch_size: int = 64) -> list[np.ndarray]:
    """Rewards of each prompt's responses (a list of [K_i] arrays) under the scalar-head model ``params``."""
    out = []
    for start in range(0, len(rankings), batch_size):
        chunk = rankings[start : start + batch_size]
        batch = ranked_batch(vocab, chunk, seq_len)
        r_BK = np.asarray(jax.device_get(_rewards(params, batch, ctx)))
        out += [r_BK[b, : len(chunk[b][1])] for b in range(len(chunk))]
    return out


def demonstrations(data_cfg, vocab, n: int) -> list[tuple[str, list[str]]]:
    """Up to ``n`` (prompt, [response]) demonstrations of a data section's 'sft' sources (train split)."""
    counts: dict = collections.defaultdict(collections.Counter)
    per_source = pipeline.load_records(data_cfg, "sft", "train", vocab, counts)
    recs = [r for name in sorted(per_source) for r in per_source[name]]
    return [(r["prompt"], [r["response"]]) for r in recs[:n]]


def normalize_state(config, train_state, ctx, mesh) -> tuple[Any, dict]:
    """Fold -mean(reward of the demonstrations) into the scalar head's bias, for the params and (scored on
    its own) the EMA. Called first with ``train_state=None`` to check the data before training starts."""
    del mesh
    section = config.get("normalize")
    if section is None or not section.examples:
        if train_state is None:
            logging.warning("config.normalize is not set: the reward model's scores will not be normalised")
        return train_state, {}

    vocab = data.get_vocabulary(section.data)
    demos = demonstrations(section.data, vocab, section.examples if train_state is not None else 1)
    if not demos:
        raise ValueError("config.normalize.data yields no demonstrations ('sft' records) to normalise with")
    if train_state is None:
        return None, {}

    def mean_reward(params, which: str) -> float:
        rewards = score(ctx, full_params(params, ctx), vocab, demos, config.train.seq_len)
        mean = float(np.mean(np.concatenate(rewards)))
        if not np.isfinite(mean):  # folded into value_bias it would poison every score, and the checkpoint
            raise FloatingPointError(
                f"reward normalisation: the {which} scored the {len(demos)} demonstrations of "
                f"config.normalize {mean} on average, which is not finite: nothing is folded into value_bias "
                "and the final checkpoint is not written (the earlier ones are left as they were)"
            )
        return mean

    def shift(params, mean):
        return {**params, "value_bias": params["value_bias"] - jnp.asarray(mean, params["value_bias"].dtype)}

    mean = mean_reward(train_state.params, "params")
    out = {"demo_reward_before": mean, "demos": float(len(demos))}
    train_state = train_state.replace(params=shift(train_state.params, mean))
    if train_state.ema_params is not None:
        out["demo_reward_before_ema"] = ema_mean = mean_reward(train_state.ema_params, "EMA params")
        train_state = train_state.replace(ema_params=shift(train_state.ema_params, ema_mean))
    logging.info("reward normalised: demonstrations scored %.4f on average; folded into value_bias", mean)
    return train_state, out


def evaluate_rm(
    ctx,
    params,
    vocab,
    rankings: Sequence[tuple[str, Sequence[str]]],
    seq_len: int,
    gold: Callable[[str, str], float] | None = None,
) -> dict[str, float]:
    """Held-out pairwise accuracy against the labels' order (best -> worst), reward mean / std, and with
    ``gold(prompt, response)`` the fraction of pairs (gold not tied) the RM orders like the gold reward."""
    rewards = score(ctx, params, vocab, list(rankings), seq_len)
    right = pairs = agree = gold_pairs = 0
    for (prompt, responses), r in zip(rankings, rewards, strict=True):
        g = [gold(prompt, x) for x in responses] if gold else None
        for i in range(len(r)):
            for j in range(i + 1, len(r)):
                pairs += 1
                right += r[i] > r[j]
                if g is not None and g[i] != g[j]:
                    gold_pairs += 1
                    agree += (r[i] > r[j]) == (g[i] > g[j])
    flat = np.concatenate(rewards)
    out = {
        "pairwise_accuracy": right / max(pairs, 1),
        "reward_mean": float(flat.mean()),
        "reward_std": float(flat.std()),
        "pairs": float(pairs),
    }
    if gold is not None:
        out["gold_agreement"] = agree / max(gold_pairs, 1)
    return out
