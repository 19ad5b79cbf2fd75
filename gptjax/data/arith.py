"""The built-in arithmetic task: problems with exact integer answers that a program checks (RL with verifiable
rewards), generated from a seed, no download.

A prompt is a chain of 3-4 single digits joined by + and -, ending with ``A:``; a response works it left to
right, one operation per step, and ends with the final answer form ``=> N``:

    Q: 7+2-5+3 A:    ->    7+2=9 9-5=4 4+3=7 => 7
    Q: 8-8+4 A:      ->    8-8=0 0+4=4 => 4

Every number and every partial result is in [0, max_value] (``data.arith``; 9 by default: the 110 one-digit
facts, which a tiny byte-level model learns from a few hundred steps of text, while a chain of 2-3 of them
still goes wrong often enough at temperature 1 to leave RL room). ``check(prompt, response, answer)``
accepts a response whose text ends with ``=> N`` (whitespace around N allowed, nothing after it) where N
equals the answer; the steps before it are not graded. ``verified_reward`` (1 right, 0 wrong) and
``format_reward`` (1 when the final form parses) are reward functions ``fn(prompts, responses, **fields)``
for an RL rollout, whose prompt records carry the answer as the field ``answer`` (a string, e.g. ``"7"``).
``gold_reward(prompt, response, finished)`` solves the prompt itself, for evaluators (``evals.gold``'s
``gold``, with ``eval_prompts`` as its ``prompts_fn``); ``evaluate_accuracy`` measures a model by hand.

Problems are assigned to buckets by a stable hash of the expression: held-out (10%), SFT demonstrations
(10%), RL prompts (30%) and pretraining text (50%), so no problem is in two of them and a held-out problem is
never trained on in any stage (its steps, e.g. ``7+2=9``, are facts other problems share). Pretraining
documents are one worked problem each, some flawed (``text_noise``); demonstrations are few and some flawed
(``sft_noise``): a slipped step, a miscopied final answer, no final answer form, or the right answer without
the work (a model that copies that habit guesses). A model imitating them picks up the flaws at about their
rate when it samples; RL with the checker's reward can unlearn them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from gptjax.data.config import arith_section
from gptjax.data.tiny import stable_hash

BUCKETS = ("eval", "sft", "prompts", "text")
_BUCKET_EDGES = (0.1, 0.2, 0.5, 1.0)
RECORD_FORMATS = ("text", "sft", "prompt")  # no rankings: this task is for pretraining, SFT and RL
_PROMPT = re.compile(r"Q: (\d+(?:[+-]\d+)+) A:")
_TERM = re.compile(r"([+-]?)(\d+)")
_FINAL = re.compile(r"=>[ \t]*(-?\d+)\s*\Z")


def bucket(prompt: str) -> str:
    h = stable_hash("arith:" + prompt)
    return next(b for b, edge in zip(BUCKETS, _BUCKET_EDGES, strict=True) if h < edge)


def _apply(total: int, op: str, x: int) -> int:
    return total + x if op == "+" else total - x


def make_prompt(rng: random.Random, max_value: int = 9, terms: tuple[int, int] = (3, 4)) -> str:
    """A random problem of ``terms`` numbers joined by + and -: every number and every partial result is in
    [0, max_value], each step drawn uniformly from the moves that keep it there."""
    total = rng.randint(0, max_value)
    expr = str(total)
    for _ in range(rng.randint(*terms) - 1):
        moves = [("+", x) for x in range(max_value - total + 1)] + [("-", x) for x in range(total + 1)]
        op, x = rng.choice(moves)
        total = _apply(total, op, x)
        expr += f"{op}{x}"
    return f"Q: {expr} A:"


def _terms(prompt: str) -> list[tuple[str, int]]:
    """'Q: 7+12-5 A:' -> [('+', 7), ('+', 12), ('-', 5)]."""
    m = _PROMPT.fullmatch(prompt)
    if m is None:
        raise ValueError(f"not an arithmetic-task prompt (want 'Q: 7+12-5 A:'): {prompt!r}")
    return [(sign or "+", int(digits)) for sign, digits in _TERM.findall(m.group(1))]


def solve(prompt: str) -> int:
    """The exact answer to a prompt; ValueError for a prompt that is not one."""
    terms = _terms(prompt)
    total = terms[0][1]
    for op, x in terms[1:]:
        total = _apply(total, op, x)
    return total


Step = tuple[int, str, int, int]  # (left, op, right, result)


def steps(prompt: str) -> list[Step]:
    """The worked steps: 'Q: 7+12-5 A:' -> [(7, '+', 12, 19), (19, '-', 5, 14)]."""
    terms = _terms(prompt)
    out, total = [], terms[0][1]
    for op, x in terms[1:]:
        out.append((total, op, x, _apply(total, op, x)))
        total = out[-1][3]
    return out


def render(work: Sequence[Step], final: int | None) -> str:
    """A response from its steps and final answer (None: no final form): ' 7+12=19 19-5=14 => 14'."""
    text = "".join(f" {a}{op}{b}={c}" for a, op, b, c in work)
    return text if final is None else f"{text} => {final}"


def solution(prompt: str) -> str:
    """The ideal response."""
    return render(steps(prompt), solve(prompt))


def final_answer(response: str) -> int | None:
    """N of a response ending with the final answer form ``=> N``; None when it does not parse."""
    m = _FINAL.search(response)
    return int(m.group(1)) if m else None


def check(prompt: str, response: str, answer: Any) -> bool:
    """Whether ``response`` ends with ``=> N`` and N equals ``answer`` (an int or its decimal string)."""
    del prompt  # the answer is given; graded on the final form only
    got = final_answer(response)
    try:
        return got is not None and got == int(str(answer).strip())
    except ValueError:
        return False


def verified_reward(
    prompts: list[str], responses: list[str], answer: Sequence[Any] | None = None, **_: Any
) -> list[float]:
    """1.0 for a right final answer, else 0.0; a row whose record has no answer (None, e.g. another task's
    prompt in a mixture) scores 0.0. ``answer``: the prompt records' ``answer`` field, aligned with rows."""
    if answer is None:
        raise ValueError(
            "verified_reward needs the prompt records' 'answer' field (answer=[...], one per response)"
        )
    if len(answer) != len(responses) or len(prompts) != len(responses):
        raise ValueError(
            f"verified_reward: {len(prompts)} prompts, {len(responses)} responses, {len(answer)} answers"
        )
    return [
        float(a is not None and check(p, r, a)) for p, r, a in zip(prompts, responses, answer, strict=True)
    ]


def format_reward(prompts: list[str], responses: list[str], **_: Any) -> list[float]:
    """1.0 when the response ends with the final answer form ``=> N``, else 0.0."""
    del prompts
    return [float(final_answer(r) is not None) for r in responses]


def gold_reward(prompt: str, response: str, finished: bool = True) -> float:
    """1.0 for a finished (EOS) response with the right final answer, else 0.0: a response cut off at the
    token limit may have been about to write more digits."""
    return float(finished and check(prompt, response, solve(prompt)))


# ----------------------------------------------------------------------------------------------------
# Noisy responses: each a plausible mistake.


def _delta(rng: random.Random) -> int:
    return rng.choice([-3, -2, -1, 1, 2, 3, 10, -10])


def _slip(rng, prompt):  # one step's result is off; the later steps go on from it
    work = steps(prompt)
    k = rng.randrange(len(work))
    out, total = [], work[0][0]
    for i, (_, op, b, _) in enumerate(work):
        c = _apply(total, op, b) + (_delta(rng) if i == k else 0)
        out.append((total, op, b, c))
        total = c
    return render(out, total)


def _miscopy(rng, prompt):  # the steps are right, the final answer is not
    return render(steps(prompt), solve(prompt) + _delta(rng))


def _no_form(rng, prompt):  # right steps, no final answer form
    return render(steps(prompt), None)


def _skip(rng, prompt):  # the right answer without the work: a model that copies this habit guesses
    return render([], solve(prompt))


CORRUPTIONS: dict[str, Callable[[random.Random, str], str]] = {
    "slip": _slip,
    "miscopy": _miscopy,
    "no_form": _no_form,
    "skip": _skip,
}


def noisy_response(rng: random.Random, prompt: str, noise: float) -> str:
    """The solution with probability 1 - noise, else one corruption chosen uniformly."""
    if rng.random() >= noise:
        return solution(prompt)
    return CORRUPTIONS[rng.choice(sorted(CORRUPTIONS))](rng, prompt)


# ----------------------------------------------------------------------------------------------------
# Record generators (the formats of gptjax.data.sources), from the data.arith config section.


def _rng(seed: int, what: str) -> random.Random:
    return random.Random(f"gptjax-arith-{seed}-{what}")  # str seeds hash with sha512: stable across runs


def _prompts(rng: random.Random, n: int, which: str, cfg, unique: bool = True) -> list[str]:
    out, seen, tries = [], set(), 0
    terms = (cfg.min_terms, cfg.max_terms)
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(
                f"arithmetic task: could only draw {len(out)} of {n} {which!r} problems; ask for fewer or "
                "raise data.arith.max_value"
            )
        p = make_prompt(rng, cfg.max_value, terms)
        if bucket(p) == which and not (unique and p in seen):
            seen.add(p)
            out.append(p)
    return out


def text_records(cfg, n: int) -> list[dict]:
    """Pretraining documents: one worked problem each, some wrong. One a document: positions restart at
    every document, so a problem sits at the same positions as in the demonstrations and at evaluation (the
    model finds each step's operand in the prompt by position)."""
    rng = _rng(cfg.seed, "text")
    return [
        {"text": p + noisy_response(rng, p, cfg.text_noise)} for p in _prompts(rng, n, "text", cfg, False)
    ]


def sft_records(cfg, n: int) -> list[dict]:
    rng = _rng(cfg.seed, "sft")
    return [
        {"prompt": p, "response": noisy_response(rng, p, cfg.sft_noise)} for p in _prompts(rng, n, "sft", cfg)
    ]


def prompt_records(cfg, n: int) -> list[dict]:
    """RL prompts with their answer (the record's field ``answer``, for ``verified_reward``)."""
    ps = _prompts(_rng(cfg.seed, "prompts"), n, "prompts", cfg)
    return [{"prompt": p, "fields": {"answer": str(solve(p))}} for p in ps]


def eval_problems(n: int = 200, seed: int = 0, cfg=None) -> list[tuple[str, str]]:
    """Held-out (prompt, answer) pairs, never trained on in any stage; ``cfg``: a ``data.arith`` section
    (default: its defaults at ``seed``)."""
    cfg = arith_section(seed=seed) if cfg is None else cfg
    return [(p, str(solve(p))) for p in _prompts(_rng(cfg.seed, "eval"), n, "eval", cfg)]


def eval_prompts(n: int = 200, seed: int = 0) -> list[str]:
    """Held-out prompts (``evals.gold``'s ``prompts_fn``; score with ``gold_reward``) of the default
    ``data.arith`` settings; a run with other settings evaluates on ``eval_problems(n, cfg=its section)``."""
    return [p for p, _ in eval_problems(n, seed)]


def records(fmt: str, split: str, cfg) -> list[dict]:
    """All records of one format for 'train' or 'validation', from the ``data.arith`` config section."""
    if split == "train":
        if fmt == "text":
            return text_records(cfg, cfg.num_docs)
        if fmt == "sft":
            return sft_records(cfg, cfg.num_sft)
        if fmt == "prompt":
            return prompt_records(cfg, cfg.num_prompts)
    elif split == "validation" and fmt in RECORD_FORMATS:
        problems = eval_problems(cfg.num_eval, cfg=cfg)
        if fmt == "text":
            return [{"text": p + solution(p)} for p, _ in problems]
        if fmt == "sft":
            return [{"prompt": p, "response": solution(p)} for p, _ in problems]
        return [{"prompt": p, "fields": {"answer": a}} for p, a in problems]
    raise ValueError(
        f"arithmetic task: no {fmt!r} records for split {split!r} (it has formats {RECORD_FORMATS})"
    )


# ----------------------------------------------------------------------------------------------------
# Held-out accuracy of a model.


def evaluate_accuracy(
    cfg,
    params,
    vocab,
    problems: Sequence[tuple[str, str]],
    temperature: float = 0.0,
    samples: int = 1,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """A language model's accuracy on ``problems`` ((prompt, answer) pairs): ``samples`` answers to each at
    ``temperature`` (0: greedy); right = ended with EOS and ``check`` passes. Returns accuracy, its standard
    error over problems, the share of answers in the final form, EOS rate and a few examples."""
    # jax: heavy, and only evaluation samples
    import jax
    import numpy as np

    from gptjax.model.sample_text import sample_batches

    prompts = [p for p, _ in problems]
    answers = {p: a for p, a in problems}
    right, parsed, ended, examples = [], [], [], []
    batches = sample_batches(
        cfg, params, vocab, prompts, samples, jax.random.key(seed), max_new_tokens, temperature, batch_size
    )
    for chunk, texts, ended_B, *_ in batches:
        for p, text, e in zip(chunk, texts, ended_B, strict=True):
            right.append(bool(e) and check(p, text, answers[p]))
            parsed.append(final_answer(text) is not None)
            ended.append(bool(e))
            if len(examples) < 8:
                examples.append({"prompt": p, "response": text, "right": right[-1]})
    per_problem = np.reshape(right, (len(prompts), samples)).mean(axis=1)
    return {
        "accuracy": float(np.mean(right)),
        "accuracy_se": float(per_problem.std(ddof=1) / np.sqrt(len(prompts))) if len(prompts) > 1 else 0.0,
        "format_rate": float(np.mean(parsed)),
        "eos_rate": float(np.mean(ended)),
        "n": len(right),
        "examples": examples,
    }
