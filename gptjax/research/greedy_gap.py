"""Why an RL policy's greedy answers can score below its SFT start while its sampled answers score above it.

Pure functions over loaded models (``(cfg, params)`` pairs) and over their answers, for the four
measurements ``scripts/greedy_gap.py`` tabulates on the tiny task's held-out prompts:

- ``sweep`` / ``sweep_table``: the gold reward of each policy's answers at several sampling temperatures
  (0 = greedy), the same prompts and keys for every policy, differences paired by prompt;
- ``mode_agreement``: where two policies' greedy answers differ, whether the reward model and the gold reward
  agree on which is better (the reward model's accuracy at the mode, against its accuracy elsewhere);
- ``by_kind``: a paired difference per task kind (the prompt's first word: sort, uniq, add, ...), and
  ``by_quantile`` the same per quartile of e.g. the base model's probability of its greedy answer;
- ``response_stats`` / ``sharpness``: per-token entropy of a policy along given answers and the probability
  it gives them (how sharp its mode is).

Answers are sampled the way the gold evaluator samples them (``gptjax.model.sample_text.sample_batches``: a
key per batch row offset, fixed-shape batches), so at the evaluator's seed and batch size the temperature-1
numbers are the gold evaluator's and the temperature-0 ones its greedy numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.evals.evaluate import standard_error
from gptjax.losses import logprobs as logprobs_lib
from gptjax.model.sample_text import sample_batches
from gptjax.research import report
from gptjax.rl import reward

GoldFn = Callable[..., float]  # gold(prompt, response, finished=bool) -> float
Policy = tuple[Any, Any]  # (ModelConfig, params)


@dataclasses.dataclass(frozen=True)
class Answers:
    """``samples`` answers to each of P prompts, prompt-major: ``texts[p][i]``, ``ended_PN[p, i]``."""

    texts: list[list[str]]
    ended_PN: np.ndarray

    @property
    def samples(self) -> int:
        return self.ended_PN.shape[1]


def task_kind(prompt: str) -> str:
    """A tiny-task prompt's kind: its first word ('sort cadb=' -> 'sort')."""
    return prompt.split(" ", 1)[0]


def sample_answers(
    policy: Policy,
    vocab: Any,
    prompts: Sequence[str],
    *,
    samples: int,
    temperature: float,
    rng: jax.Array,
    max_new_tokens: int = 24,
    batch_size: int = 128,
) -> Answers:
    """``samples`` answers per prompt at ``temperature`` (0: greedy, one answer is enough), as the gold
    evaluator samples them."""
    cfg, params = policy
    texts: list[str] = []
    ended: list[bool] = []
    batches = sample_batches(
        cfg, params, vocab, prompts, samples, rng, max_new_tokens, temperature, batch_size
    )
    for _, t, e, *_ in batches:
        texts += t
        ended += [bool(x) for x in e]
    return Answers(
        texts=[texts[i : i + samples] for i in range(0, len(texts), samples)],
        ended_PN=np.asarray(ended, bool).reshape(len(prompts), samples),
    )


def gold_scores(prompts: Sequence[str], answers: Answers, gold: GoldFn) -> np.ndarray:
    """gold_PN: the gold reward of every answer (an answer without EOS as unfinished)."""
    return np.array(
        [
            [gold(p, t, finished=bool(e)) for t, e in zip(ts, es, strict=True)]
            for p, ts, es in zip(prompts, answers.texts, answers.ended_PN, strict=True)
        ],
        np.float64,
    ).reshape(len(prompts), answers.samples)


def paired(a_P: np.ndarray, b_P: np.ndarray) -> tuple[float, float]:
    """(mean of a - b, its standard error), paired by prompt."""
    d_P = np.asarray(a_P, np.float64) - np.asarray(b_P, np.float64)
    return float(d_P.mean()), standard_error(d_P)


def sweep(
    policies: Mapping[str, Policy],
    vocab: Any,
    prompts: Sequence[str],
    temperatures: Sequence[float],
    *,
    samples: int,
    seed: int = 1,
    max_new_tokens: int = 24,
    batch_size: int = 128,
) -> dict[float, dict[str, Answers]]:
    """{temperature: {policy: Answers}}: every policy answers the same prompts with the same keys
    (``jax.random.key(seed)``, the gold evaluator's default 1); one answer per prompt at temperature 0."""
    rng = jax.random.key(seed)
    return {
        t: {
            name: sample_answers(
                policy,
                vocab,
                prompts,
                samples=1 if t == 0 else samples,
                temperature=t,
                rng=rng,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
            for name, policy in policies.items()
        }
        for t in temperatures
    }


def sweep_table(
    prompts: Sequence[str], answers: Mapping[float, Mapping[str, Answers]], gold: GoldFn, base: str = "sft"
) -> dict[str, dict[str, dict[str, float]]]:
    """{str(temperature): {policy: {gold, gold_se, vs_<base>, vs_<base>_se, distinct}}}: mean gold reward
    (standard error over prompts), the paired difference from the policy ``base`` and the mean number of
    distinct answers per prompt (how spread its samples are)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for t, per_policy in answers.items():
        per_prompt = {n: gold_scores(prompts, a, gold).mean(axis=1) for n, a in per_policy.items()}
        row: dict[str, dict[str, float]] = {}
        for name, g_P in per_prompt.items():
            a = per_policy[name]
            row[name] = {
                "gold": float(g_P.mean()),
                "gold_se": standard_error(g_P),
                "distinct": float(np.mean([len(set(ts)) for ts in a.texts])),
            }
            if base in per_prompt and name != base:
                d, d_se = paired(g_P, per_prompt[base])
                row[name].update({f"vs_{base}": d, f"vs_{base}_se": d_se})
        out[f"{t:g}"] = row
    return out


CELLS = ("up", "tie", "down")


def _sign(x: float) -> str:
    return "up" if x > 0 else "down" if x < 0 else "tie"


def mode_agreement(
    gold_a_P: np.ndarray, gold_b_P: np.ndarray, rm_a_P: np.ndarray, rm_b_P: np.ndarray, same_P: np.ndarray
) -> dict[str, float]:
    """How a reward model and the gold reward judge answer b against answer a, prompt by prompt (a: e.g. the
    SFT model's greedy answer, b: the RL policy's).

    Returns ``prompts``, ``same`` (identical answers), ``differ``, a count per cell ``rm_<up|tie|down>_gold_
    <up|tie|down>`` of the differing prompts (whether b's score is above, equal to or below a's), each cell's
    share of the mean gold difference over ALL prompts (``gold_diff_<cell>``: the cells' shares add up to
    mean(gold_b - gold_a)), and the reward model's accuracy on the differing pairs whose gold is not tied
    (``rm_accuracy``: it orders them like the gold, over ``gold_pairs`` pairs)."""
    gold_a_P, gold_b_P = np.asarray(gold_a_P, np.float64), np.asarray(gold_b_P, np.float64)
    rm_a_P, rm_b_P = np.asarray(rm_a_P, np.float64), np.asarray(rm_b_P, np.float64)
    same_P = np.asarray(same_P, bool)
    n = len(gold_a_P)
    out: dict[str, float] = {"prompts": n, "same": int(same_P.sum()), "differ": int((~same_P).sum())}
    for r in CELLS:
        for g in CELLS:
            out[f"rm_{r}_gold_{g}"] = 0
            out[f"gold_diff_rm_{r}_gold_{g}"] = 0.0
    right = pairs = 0
    for ga, gb, ra, rb, same in zip(gold_a_P, gold_b_P, rm_a_P, rm_b_P, same_P, strict=True):
        if same:
            continue
        cell = f"rm_{_sign(rb - ra)}_gold_{_sign(gb - ga)}"
        out[cell] += 1
        out[f"gold_diff_{cell}"] += (gb - ga) / n
        if gb != ga:
            pairs += 1
            right += (rb - ra) * (gb - ga) > 0
    out["gold_pairs"] = pairs
    out["rm_accuracy"] = right / pairs if pairs else float("nan")
    return out


def rm_gold_accuracy(
    gold_a_PN: np.ndarray, gold_b_PN: np.ndarray, rm_a_PN: np.ndarray, rm_b_PN: np.ndarray
) -> dict[str, float]:
    """The reward model's accuracy (ordering like the gold reward) on pairs (a[p, i], b[p, i]) whose gold is
    not tied: e.g. the two policies' i-th samples of the same prompt; ``pairs`` counted."""
    dg = np.asarray(gold_b_PN, np.float64) - np.asarray(gold_a_PN, np.float64)
    dr = np.asarray(rm_b_PN, np.float64) - np.asarray(rm_a_PN, np.float64)
    keep = dg != 0
    pairs = int(keep.sum())
    return {"pairs": pairs, "rm_accuracy": float(np.mean(dg[keep] * dr[keep] > 0)) if pairs else float("nan")}


def by_kind(prompts: Sequence[str], a_P: np.ndarray, b_P: np.ndarray) -> dict[str, dict[str, float]]:
    """{kind: {n, a, b, diff, diff_se}} per task kind (``task_kind``), kinds sorted: the mean of a and b per
    prompt and b - a paired by prompt."""
    kinds = np.array([task_kind(p) for p in prompts])
    a_P, b_P = np.asarray(a_P, np.float64), np.asarray(b_P, np.float64)
    out = {}
    for k in sorted(set(kinds)):
        m = kinds == k
        d, d_se = paired(b_P[m], a_P[m])
        out[str(k)] = {"n": int(m.sum()), "a": float(a_P[m].mean()), "b": float(b_P[m].mean()), "diff": d}
        out[str(k)]["diff_se"] = d_se
    return out


def by_quantile(
    x_P: np.ndarray, a_P: np.ndarray, b_P: np.ndarray, same_P: np.ndarray, bins: int = 4
) -> list[dict[str, float]]:
    """Prompts split into ``bins`` equal-count groups by ``x_P`` (e.g. the base model's probability of its
    own greedy answer), low to high: each group's range of x, size, share of prompts whose answers differ,
    mean of a and b - a paired by prompt (``diff``, ``diff_se``)."""
    x_P, a_P, b_P = (np.asarray(v, np.float64) for v in (x_P, a_P, b_P))
    same_P = np.asarray(same_P, bool)
    out = []
    for idx in np.array_split(np.argsort(x_P, kind="stable"), bins):
        if not len(idx):
            continue
        d, d_se = paired(b_P[idx], a_P[idx])
        out.append(
            {
                "lo": float(x_P[idx].min()),
                "hi": float(x_P[idx].max()),
                "n": len(idx),
                "changed": float(np.mean(~same_P[idx])),
                "a": float(a_P[idx].mean()),
                "diff": d,
                "diff_se": d_se,
            }
        )
    return out


def _token_terms_fn(cfg, params, tokens_NL, prompt_lengths_N, lengths_N):
    """(logp_N, entropy_N, tokens_N, all_top_N) of each row's response tokens (EOS included)."""
    terms = logprobs_lib.next_token_terms(cfg, params, tokens_NL, entropy=True)
    mask_NL = logprobs_lib.response_mask(prompt_lengths_N, lengths_N, tokens_NL.shape[1])
    mask_NL = mask_NL & (jnp.arange(tokens_NL.shape[1]) >= 1)
    count_N = jnp.maximum(mask_NL.sum(axis=1), 1)
    logp_N = jnp.sum(jnp.where(mask_NL, terms["logp"], 0.0), axis=1)
    entropy_N = jnp.sum(jnp.where(mask_NL, terms["entropy"], 0.0), axis=1) / count_N
    all_top_N = jnp.all(jnp.where(mask_NL, terms["hit"] > 0, True), axis=1)
    return logp_N, entropy_N, mask_NL.sum(axis=1), all_top_N


_token_terms = jax.jit(_token_terms_fn, static_argnums=0)


def response_stats(
    policy: Policy,
    vocab: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    seq_len: int = 64,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Under ``policy`` (temperature 1), for each (prompt, response) tokenized as the data layer does (BOS
    prompt response EOS): ``logp_P`` log p(response + EOS | prompt), ``entropy_P`` the mean entropy (nats)
    of the next-token distributions along it, ``tokens_P`` its tokens (EOS included) and ``mode_P`` whether
    every one of them is the policy's most likely token (the response is the policy's greedy answer)."""
    cfg, params = policy
    cols: dict[str, list] = {"logp_P": [], "entropy_P": [], "tokens_P": [], "mode_P": []}
    pairs = [(p, [r]) for p, r in zip(prompts, responses, strict=True)]
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one shape: one compilation
        batch = reward.ranked_batch(vocab, chunk, seq_len)
        out = _token_terms(
            cfg,
            params,
            jnp.asarray(batch["tokens_BKL"][:, 0]),
            jnp.asarray(batch["prompt_lengths_BK"][:, 0]),
            jnp.asarray(batch["lengths_BK"][:, 0]),
        )
        n = min(batch_size, len(pairs) - start)
        for key, v in zip(cols, jax.device_get(out), strict=True):
            cols[key].append(np.asarray(v)[:n])
    return {k: np.concatenate(v) for k, v in cols.items()}


def sharpness(stats: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Summary of ``response_stats``: mean per-token entropy, mean probability and log-probability of the
    responses, and the share of them that are the policy's greedy path."""
    return {
        "entropy": float(np.mean(stats["entropy_P"])),
        "prob": float(np.mean(np.exp(stats["logp_P"]))),
        "logp": float(np.mean(stats["logp_P"])),
        "mode_share": float(np.mean(stats["mode_P"])),
    }


RewardFn = Callable[[list[tuple[str, list[str]]]], list[np.ndarray]]  # the evaluators' reward-model scorer


def rm_scores(reward_fn: RewardFn, prompts: Sequence[str], answers: Answers) -> np.ndarray:
    """rm_PN: the reward model's score of every answer (``gptjax.evals.gold.reward_fn``'s scorer)."""
    return np.stack(reward_fn([(p, list(ts)) for p, ts in zip(prompts, answers.texts, strict=True)]))


def analyse(
    policies: Mapping[str, Policy],
    vocab: Any,
    prompts: Sequence[str],
    gold: GoldFn,
    reward_fn: RewardFn,
    *,
    temperatures: Sequence[float] = (0.0, 0.25, 0.5, 0.7, 1.0),
    samples: int = 4,
    base: str = "sft",
    seed: int = 1,
    max_new_tokens: int = 24,
    batch_size: int = 128,
    seq_len: int = 64,
) -> dict[str, Any]:
    """The four measurements, each policy against ``base`` on ``prompts``: ``temperature`` (``sweep_table``;
    temperatures must include 0, and the highest one is "sampled" below), ``modes`` (``mode_agreement`` of
    the greedy answers, overall and per kind, and where they differ each model's log-probability margin
    for its own answer over the other's; beside it the reward model's accuracy on the policies' i-th
    samples at the highest temperature and on pairs of the base policy's own samples), ``kinds`` (``by_kind``
    greedy and sampled) and ``sharpness`` (``response_stats`` along the policy's own greedy answers, the
    base's greedy answers and its own samples). JSON-ready."""
    if 0.0 not in temperatures:
        raise ValueError(f"temperatures {list(temperatures)} must include 0 (the greedy answers)")
    if base not in policies:
        raise ValueError(f"base policy {base!r} is not among {sorted(policies)}")
    hot = max(temperatures)
    answers = sweep(
        policies,
        vocab,
        prompts,
        temperatures,
        samples=samples,
        seed=seed,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    greedy, sampled = answers[0.0], answers[hot]
    gold0 = {n: gold_scores(prompts, a, gold)[:, 0] for n, a in greedy.items()}
    gold1 = {n: gold_scores(prompts, a, gold) for n, a in sampled.items()}
    rm0 = {n: rm_scores(reward_fn, prompts, a)[:, 0] for n, a in greedy.items()}
    rm1 = {n: rm_scores(reward_fn, prompts, a) for n, a in sampled.items()}
    kinds_P = np.array([task_kind(p) for p in prompts])
    out: dict[str, Any] = {
        "prompts": len(prompts),
        "samples": samples,
        "base": base,
        "sampled_temperature": hot,
        "temperature": sweep_table(prompts, answers, gold, base),
        "modes": {},
        "kinds": {},
        "sharpness": {},
    }
    half = sampled[base].samples // 2  # sample i against sample half + i of the same prompt
    if half:
        first, second = slice(0, half), slice(half, 2 * half)
        out["rm_on_base_samples"] = rm_gold_accuracy(
            gold1[base][:, first], gold1[base][:, second], rm1[base][:, first], rm1[base][:, second]
        )
    greedy_text = {n: [t[0] for t in a.texts] for n, a in greedy.items()}
    # (whose model, whose greedy answers) -> response_stats: each model on its own and the base's answers,
    # the base model on every policy's
    pairs = dict.fromkeys(pair for n in policies for pair in ((n, n), (n, base), (base, n)))
    along = {
        (who, whose): response_stats(policies[who], vocab, prompts, greedy_text[whose], seq_len=seq_len)
        for who, whose in pairs
    }
    for name, policy in policies.items():
        if name != base:
            same_P = np.array([a == b for a, b in zip(greedy_text[base], greedy_text[name], strict=True)])
            args = (gold0[base], gold0[name], rm0[base], rm0[name], same_P)
            differ_P = ~same_P
            out["modes"][name] = {
                **mode_agreement(*args),
                # where the answers differ, how much more likely each model finds its own (nats)
                "base_margin": _mean(
                    along[base, base]["logp_P"][differ_P] - along[base, name]["logp_P"][differ_P]
                ),
                "policy_margin": _mean(
                    along[name, name]["logp_P"][differ_P] - along[name, base]["logp_P"][differ_P]
                ),
                # how sure the base model was of its greedy answer, against how often and how it changed
                "by_base_prob": by_quantile(
                    np.exp(along[base, base]["logp_P"]), gold0[base], gold0[name], same_P
                ),
                "rm_on_samples": rm_gold_accuracy(gold1[base], gold1[name], rm1[base], rm1[name]),
                "by_kind": {
                    str(k): mode_agreement(*(x[kinds_P == k] for x in args)) for k in sorted(set(kinds_P))
                },
            }
            out["kinds"][name] = {
                "greedy": by_kind(prompts, gold0[base], gold0[name]),
                "sampled": by_kind(prompts, gold1[base].mean(axis=1), gold1[name].mean(axis=1)),
            }
        rep = [p for p in prompts for _ in range(sampled[name].samples)]
        flat = [x for ts in sampled[name].texts for x in ts]
        out["sharpness"][name] = {
            "own_greedy": sharpness(along[name, name]),
            f"{base}_greedy": sharpness(along[name, base]),
            "own_samples": sharpness(response_stats(policy, vocab, rep, flat, seq_len=seq_len)),
        }
    return out


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def _pm(mean: float | None, err: float | None) -> str:
    return "-" if mean is None else f"{mean:+.3f} +- {err:.3f}"


def report_lines(res: Mapping[str, Any], rm_reference: Mapping[str, float] | None = None) -> list[str]:
    """Markdown tables of ``analyse``'s result (``rm_reference``: the reward model's held-out pairwise
    accuracy and gold agreement, ``gptjax.evals.rm_accuracy``'s, for comparison)."""
    base, hot = res["base"], res["sampled_temperature"]
    names = list(next(iter(res["temperature"].values())))
    others = [n for n in names if n != base]
    lines = [
        f"Gold reward by sampling temperature ({res['prompts']} held-out prompts, {res['samples']} answers "
        f"each, 1 at T = 0; differences from {base} paired by prompt; distinct: different answers per "
        "prompt):",
        "",
        *report.table(
            ["T", *(f"{n} gold" for n in names), *(f"{n} - {base}" for n in others), "distinct"],
            [
                [
                    t,
                    *(report.fmt(row[n]["gold"]) for n in names),
                    *(_pm(row[n].get(f"vs_{base}"), row[n].get(f"vs_{base}_se")) for n in others),
                    " / ".join(f"{row[n]['distinct']:.2f}" for n in names),
                ]
                for t, row in res["temperature"].items()
            ],
        ),
        "",
        f"Greedy answers against {base}'s, where they differ: how the reward model (RM) and the gold reward "
        "judge the policy's answer against the base's (RM up: it scores the policy's higher); "
        "RM accuracy: it orders the pair like the gold (gold ties left out); gold share: that cell's part of "
        "the mean greedy gold difference over all prompts:",
        "",
    ]
    cells = [(r, g) for r in ("up", "down") for g in ("up", "tie", "down")]
    lines += report.table(
        ["policy", "same", "differ", *(f"RM {r} / gold {g}" for r, g in cells), "RM accuracy"],
        [
            [
                n,
                m["same"],
                m["differ"],
                *(
                    f"{m[f'rm_{r}_gold_{g}']} ({m[f'gold_diff_rm_{r}_gold_{g}']:+.3f})"
                    if g != "tie"
                    else str(m[f"rm_{r}_gold_{g}"])
                    for r, g in cells
                ),
                f"{m['rm_accuracy']:.3f} ({m['gold_pairs']} pairs)",
            ]
            for n, m in res["modes"].items()
        ],
    )
    ref = [
        f"the policy's and {base}'s i-th samples at T = {hot:g}: "
        + ", ".join(f"{n} {m['rm_on_samples']['rm_accuracy']:.3f}" for n, m in res["modes"].items())
    ]
    if "rm_on_base_samples" in res:
        ref.append(f"pairs of {base}'s own samples: {res['rm_on_base_samples']['rm_accuracy']:.3f}")
    if rm_reference:
        ref.append(
            f"held-out labelled rankings: {rm_reference['pairwise_accuracy']:.3f} like the labelers, "
            f"{rm_reference['gold_agreement']:.3f} like the gold"
        )
    lines += ["", "RM accuracy elsewhere (ordering like the gold): " + "; ".join(ref) + ".", ""]
    lines += [
        "Where the greedy answers differ, how much more likely each model finds its own greedy answer than "
        "the other's (log p, nats, mean over those prompts): "
        + "; ".join(
            f"{base} over {n}'s {m['base_margin']:.2f}, {n} over {base}'s {m['policy_margin']:.2f}"
            for n, m in res["modes"].items()
        )
        + ".",
        "",
    ]
    quartiles = {n: res["modes"][n]["by_base_prob"] for n in others}
    rows = []
    for i, q in enumerate(quartiles[others[0]] if others else []):
        row = [f"{q['lo']:.2f} - {q['hi']:.2f}", report.fmt(q["a"])]
        row += [
            f"{qs[i]['changed']:.2f} / {_pm(qs[i]['diff'], qs[i]['diff_se'])}" for qs in quartiles.values()
        ]
        rows.append(row)
    lines += [
        f"Greedy answers by how likely {base} found its own (quartiles of p({base} greedy answer)): share of "
        f"prompts whose greedy answer changed, {base}'s greedy gold, the change:",
        "",
        *report.table(
            [f"p({base} greedy)", f"{base} greedy", *(f"{n}: changed / gold change" for n in others)], rows
        ),
        "",
    ]
    kinds = sorted(next(iter(res["kinds"].values()))["greedy"]) if res["kinds"] else []
    header = ["kind", "n", f"{base} greedy"]
    for n in others:
        header += [f"{n} - {base} greedy", f"{n} - {base} T = {hot:g}", f"{n}: greedy changed", "RM acc."]
    rows = []
    for k in kinds:
        first = res["kinds"][others[0]]["greedy"][k]
        row = [k, first["n"], report.fmt(first["a"])]
        for n in others:
            g, s, m = (
                res["kinds"][n]["greedy"][k],
                res["kinds"][n]["sampled"][k],
                res["modes"][n]["by_kind"][k],
            )
            row += [_pm(g["diff"], g["diff_se"]), _pm(s["diff"], s["diff_se"]), m["differ"]]
            row.append(report.fmt(m["rm_accuracy"]))
        rows.append(row)
    lines += ["Per task kind (greedy gold and its change; RM acc.: at the changed greedy answers):", ""]
    lines += [*report.table(header, rows), ""]
    lines += [
        f"Sharpness (temperature 1): mean per-token entropy (nats) and mean probability of the policy's own "
        f"greedy answer, of {base}'s greedy answer, of its own T = {hot:g} samples; mode share: answers that "
        "are the policy's greedy path:",
        "",
        *report.table(
            [
                "policy",
                "entropy (own greedy)",
                "p(own greedy)",
                f"p({base} greedy)",
                f"{base} greedy is mode",
                "entropy (samples)",
                "p(sample)",
            ],
            [
                [
                    n,
                    report.fmt(s["own_greedy"]["entropy"]),
                    report.fmt(s["own_greedy"]["prob"]),
                    report.fmt(s[f"{base}_greedy"]["prob"]),
                    report.fmt(s[f"{base}_greedy"]["mode_share"]),
                    report.fmt(s["own_samples"]["entropy"]),
                    report.fmt(s["own_samples"]["prob"]),
                ]
                for n, s in res["sharpness"].items()
            ],
        ),  # fmt: skip
    ]
    return lines
