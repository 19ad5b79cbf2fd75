"""Best-of-N sampling and the reward-model overoptimization fits (Gao et al. 2022; docs/references.md).

    proxy_BN, gold_BN = sample_and_score(cfg, params, vocab, prompts, n=64, rng=..., reward_fn=..., gold=...)
    curve = best_of_n_curve(proxy_BN, gold_BN, ns=(1, 2, 4, 8, 16, 32, 64))   # gold / proxy against n and KL
    alpha, beta = fit_bon(d, gold)          # gold = d (alpha - beta d),     d = sqrt(KL)
    alpha, beta = fit_rl(d, gold)           # gold = d (alpha - beta log d)

Best-of-n picks, for each prompt, the response with the highest proxy (reward-model) score among n samples
of the policy; its KL to the policy is analytic, ``kl_bon(n) = log n - (n - 1) / n``. The expected score of
best-of-n is estimated without bias from N >= n samples per prompt: sorted by proxy score, the sample of rank
r (0 = lowest) is the best of a uniformly drawn n-subset with probability C(r, n-1) / C(N, n)
(``best_of_n_weights``), so one pool of N samples gives every n <= N with far less noise than fresh draws.

Fits are least squares on the gold reward measured relative to the starting policy's (d = 0 means no
optimisation, reward change 0), linear in (alpha, beta) for both forms.
"""

from __future__ import annotations

import collections
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from gptjax import checkpoint, data
from gptjax.data import pipeline
from gptjax.model import sample_text
from gptjax.rl import reward, rollout


def kl_bon(n: int | np.ndarray) -> np.ndarray:
    """KL(best-of-n || policy) in nats: log n - (n - 1) / n (0 at n = 1)."""
    n = np.asarray(n, np.float64)
    return np.log(n) - (n - 1.0) / n


def best_of_n_weights(N: int, n: int) -> np.ndarray:
    """[N] probability that the sample of proxy rank r (ascending) is the best of a random n-subset."""
    if not 1 <= n <= N:
        raise ValueError(f"best-of-n needs 1 <= n <= N samples per prompt; got n={n}, N={N}")
    w = np.array([math.comb(r, n - 1) for r in range(N)], np.float64)
    return w / math.comb(N, n)


def best_of_n_expectation(proxy_BN: np.ndarray, values_BN: np.ndarray, n: int) -> np.ndarray:
    """[B] expected ``values`` of the proxy-best of n samples, each prompt's N samples a pool (unbiased).

    Ties in the proxy score are broken by sample order (as argmax does)."""
    proxy_BN, values_BN = np.asarray(proxy_BN), np.asarray(values_BN, np.float64)
    if proxy_BN.shape != values_BN.shape or proxy_BN.ndim != 2:
        raise ValueError(
            f"proxy and values must both be [prompts, N]; got {proxy_BN.shape}, {values_BN.shape}"
        )
    # ascending by proxy, later samples first among ties, so the argmax (first maximal) ranks highest
    N = proxy_BN.shape[1]
    order_BN = np.lexsort((-np.arange(N)[None].repeat(len(proxy_BN), 0), proxy_BN), axis=1)
    sorted_BN = np.take_along_axis(values_BN, order_BN, axis=1)
    return sorted_BN @ best_of_n_weights(N, n)


def pick_best(proxy_BN: np.ndarray) -> np.ndarray:
    """[B] index of the highest proxy score of each prompt (the first one on ties)."""
    return np.argmax(np.asarray(proxy_BN), axis=1)


def best_of_n_curve(proxy_BN: np.ndarray, gold_BN: np.ndarray, ns: Sequence[int]) -> list[dict[str, float]]:
    """For each n: analytic KL, d = sqrt(KL), and the proxy and gold reward of best-of-n (mean over prompts
    and its standard error), from one pool of N samples per prompt."""
    rows = []
    for n in ns:
        gold_B = best_of_n_expectation(proxy_BN, gold_BN, n)
        proxy_B = best_of_n_expectation(proxy_BN, proxy_BN, n)
        kl = float(kl_bon(n))
        rows.append(
            {
                "n": int(n),
                "kl": kl,
                "d": math.sqrt(kl),
                "gold": float(gold_B.mean()),
                "gold_se": float(gold_B.std(ddof=1) / math.sqrt(len(gold_B))),
                "proxy": float(proxy_B.mean()),
                "proxy_se": float(proxy_B.std(ddof=1) / math.sqrt(len(proxy_B))),
            }
        )
    return rows


def _fit(features_PK: np.ndarray, y_P: np.ndarray) -> tuple[float, float]:
    coef, *_ = np.linalg.lstsq(features_PK, y_P, rcond=None)
    return float(coef[0]), float(coef[1])


def fit_bon(d: Sequence[float], gain: Sequence[float]) -> tuple[float, float]:
    """(alpha, beta) of gain = d (alpha - beta d), least squares (the best-of-n form of Gao et al.)."""
    d, gain = np.asarray(d, np.float64), np.asarray(gain, np.float64)
    return _fit(np.stack([d, -d * d], axis=1), gain)


def fit_rl(d: Sequence[float], gain: Sequence[float]) -> tuple[float, float]:
    """(alpha, beta) of gain = d (alpha - beta log d), least squares (the RL form of Gao et al.); points at
    d = 0 contribute 0 = 0 and are kept."""
    d, gain = np.asarray(d, np.float64), np.asarray(gain, np.float64)
    d_log_d = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
    return _fit(np.stack([d, -d_log_d], axis=1), gain)


def bon_form(d, alpha: float, beta: float) -> np.ndarray:
    d = np.asarray(d, np.float64)
    return d * (alpha - beta * d)


def rl_form(d, alpha: float, beta: float) -> np.ndarray:
    d = np.asarray(d, np.float64)
    return d * (alpha - beta * np.log(np.where(d > 0, d, 1.0)))


def sample(
    cfg,
    params: Any,
    vocab: Any,
    prompts: Sequence[str],
    *,
    n: int,
    rng: jax.Array,
    max_new_tokens: int = 24,
    temperature: float = 1.0,
    batch_size: int = 128,
) -> tuple[list[str], list[bool]]:
    """n sampled answers to every prompt, prompt-major (prompt 0's n, then prompt 1's ...), and whether each
    ended with EOS."""
    texts: list[str] = []
    ended: list[bool] = []
    for _, t, e, *_ in sample_text.sample_batches(
        cfg, params, vocab, prompts, n, rng, max_new_tokens, temperature, batch_size
    ):
        texts += t
        ended += [bool(x) for x in e]
    return texts, ended


def sample_and_score(
    cfg,
    params: Any,
    vocab: Any,
    prompts: Sequence[str],
    *,
    n: int,
    rng: jax.Array,
    reward_fn: Callable[[list[tuple[str, list[str]]]], list[np.ndarray]],
    gold: Callable[..., float] | None = None,
    max_new_tokens: int = 24,
    temperature: float = 1.0,
    batch_size: int = 128,
) -> dict[str, Any]:
    """n samples of the policy for every prompt: their texts [B][n], proxy (reward model) scores [B, n],
    gold rewards [B, n] (with ``gold``) and whether each ended with EOS."""
    rep = [p for p in prompts for _ in range(n)]
    texts, ended = sample(
        cfg,
        params,
        vocab,
        prompts,
        n=n,
        rng=rng,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
    )
    B = len(prompts)
    proxy = np.concatenate(reward_fn([(p, [x]) for p, x in zip(rep, texts, strict=True)]))
    out = {
        "texts": [texts[i * n : (i + 1) * n] for i in range(B)],
        "proxy_BN": np.asarray(proxy, np.float64).reshape(B, n),
        "ended_BN": np.asarray(ended).reshape(B, n),
    }
    if gold is not None:
        gold_scores = [gold(p, x, finished=e) for p, x, e in zip(rep, texts, ended, strict=True)]
        out["gold_BN"] = np.asarray(gold_scores, np.float64).reshape(B, n)
    return out


# ----------------------------------------------------------------------------------------------------
# Rejection sampling (stage 'bon'): SFT on the best of n samples, written as demonstrations


def prepare_demonstrations(config, workdir: str):
    """The 'bon' stage's preparation (``gptjax.train.stages``): ``config.bon.n`` samples of the policy
    (``bon.policy``, default ``train.init_from``) for each of ``bon.prompts`` prompts of ``bon.data``, the
    reward model's (``bon.reward``) best finished one written as a demonstration to
    ``<workdir>/bon_demonstrations.jsonl`` (once: a resumed run reuses the file), and the config returned
    with that file as its SFT data. With ``bon.require_eos`` only finished samples (EOS) compete, and prompts
    whose n samples all lack EOS are skipped and counted (``bon_stats.json``, the log)."""
    path = os.path.join(workdir, "bon_demonstrations.jsonl")
    if not os.path.exists(path) and jax.process_index() == 0:
        stats = _write_demonstrations(config, path)
        with open(os.path.join(workdir, "bon_stats.json"), "w") as f:
            json.dump(stats, f, indent=1)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("bon demonstrations written")

    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.data.sources = type(c.data.sources)({"bon": data.source(format="sft", path=path)})
    c.lock()
    return c


def _write_demonstrations(config, path: str) -> dict:

    b = config.bon
    vocab = data.get_vocabulary(config.data)
    per_source = pipeline.load_records(
        b.data, "prompts", "train", vocab, collections.defaultdict(collections.Counter)
    )
    prompts = [r["prompt"] for name in sorted(per_source) for r in per_source[name]]
    if len(prompts) < b.prompts:
        raise ValueError(
            f"bon.prompts={b.prompts} but bon.data holds {len(prompts)} prompts: lower bon.prompts"
        )
    prompts = prompts[: b.prompts]
    policy = checkpoint.load_model(b.policy or config.train.init_from)
    reward_fn = reward.scorer(b.reward, vocab, config.train.seq_len)
    gold = rollout.load_gold(b.gold) if b.gold else None
    pool = sample_and_score(
        *policy,
        vocab,
        prompts,
        n=b.n,
        rng=jax.random.key(config.train.seed + 2),
        reward_fn=reward_fn,
        gold=gold,
        max_new_tokens=b.max_new_tokens,
        temperature=b.temperature,
    )
    finished_BN = pool["ended_BN"] if b.require_eos else np.ones_like(pool["ended_BN"])
    best_B = pick_best(np.where(finished_BN, pool["proxy_BN"], -np.inf))
    keep_B = finished_BN.any(axis=1)
    rows = np.arange(len(prompts))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for i in np.flatnonzero(keep_B):
            f.write(json.dumps({"prompt": prompts[i], "response": pool["texts"][i][best_B[i]]}) + "\n")
    os.replace(tmp, path)  # a complete file or none: a run killed while writing starts over
    stats = {
        "n": int(b.n),
        "prompts": len(prompts),
        "written": int(keep_B.sum()),
        "skipped_no_eos": int((~keep_B).sum()),
        "rm_best": float(pool["proxy_BN"][rows, best_B][keep_B].mean()),
        "rm_all": float(pool["proxy_BN"].mean()),
    }
    if "gold_BN" in pool:
        stats.update(
            gold_best=float(pool["gold_BN"][rows, best_B][keep_B].mean()),
            gold_all=float(pool["gold_BN"].mean()),
        )
    logging.info(
        "rejection sampling: best of %d for %d of %d prompts written to %s (%d without a finished sample "
        "skipped); RM score best %.3f vs all %.3f",
        b.n,
        stats["written"],
        len(prompts),
        path,
        stats["skipped_no_eos"],
        stats["rm_best"],
        stats["rm_all"],
    )
    return stats


def rollout_points(rows: Sequence[dict], window: int = 3) -> list[dict[str, float]]:
    """RL points from a run's rollout metrics rows ('kl' to the reference per response, 'gold_reward',
    'reward' = the proxy): means over consecutive windows of ``window`` rollouts (one rollout's numbers are
    noisy), with d = sqrt(KL) (a negative KL estimate counts as 0)."""
    rows = [r for r in rows if "gold_reward" in r and "kl" in r]
    out = []
    for start in range(0, len(rows) - window + 1, window):
        part = rows[start : start + window]
        kl = float(np.mean([r["kl"] for r in part]))
        out.append(
            {
                "kl": kl,
                "d": math.sqrt(max(kl, 0.0)),
                "gold": float(np.mean([r["gold_reward"] for r in part])),
                "proxy": float(np.mean([r["reward"] for r in part])),
            }
        )
    return out
