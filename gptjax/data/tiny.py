"""The built-in tiny task: a small synthetic instruction-following world, generated from a seed, no download.

A prompt names a task and its argument and ends with ``=``; the ideal response is the task's answer:

    rev cadb=     -> bdac          sort cadb=  -> abcd          up cadb= -> CADB
    uniq aabccb=  -> abc           add 17 25=  -> 42            max 3 8 1= -> 8

``gold_reward(prompt, response)`` is the hidden programmatic quality score (partial credit in [0, 1]): the
fraction of answer characters right at their position, minus 0.15 per character of rambling past the answer,
minus 0.3 when the response never ended (no EOS). Demonstrations are noisy (typos, cut-off answers, rambling,
the wrong task), so a model that imitates them plateaus below the best reward; rankings come from simulated
labelers who order K responses by a Plackett-Luce choice (Bradley-Terry for K=2) on the gold reward at a
noise temperature. Prompts are assigned to the stages by a stable hash, so SFT, RM, RL and held-out prompts
never overlap (the pretraining text avoids held-out prompts only).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable

LETTERS = "abcdefgh"
TASKS = ("rev", "sort", "up", "uniq", "add", "max")
BUCKETS = ("eval", "sft", "rm", "prompts")
_BUCKET_EDGES = (0.1, 0.45, 0.75, 1.0)  # held-out 10%, then SFT / RM / RL prompt shares


def stable_hash(text: str) -> float:
    """A hash of ``text`` in [0, 1) that is the same on every machine and run (unlike ``hash``)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def bucket(prompt: str) -> str:
    h = stable_hash("tiny:" + prompt)
    return next(b for b, edge in zip(BUCKETS, _BUCKET_EDGES, strict=True) if h < edge)


def _word(rng: random.Random, lo: int, hi: int, letters: str = LETTERS) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(lo, hi)))


def make_prompt(rng: random.Random) -> str:
    task = rng.choice(TASKS)
    if task in ("rev", "sort", "up"):
        arg = _word(rng, 3, 6)
    elif task == "uniq":
        arg = _word(rng, 4, 7, "".join(rng.sample(LETTERS, 4)))
    elif task == "add":
        arg = f"{rng.randint(0, 49)} {rng.randint(0, 49)}"
    else:
        arg = " ".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5)))
    return f"{task} {arg}="


def solve(prompt: str) -> str:
    """The ideal response to a tiny-task prompt; ValueError for a prompt that is not one."""
    if not prompt.endswith("=") or " " not in prompt:
        raise ValueError(f"not a tiny-task prompt (want 'TASK ARG='): {prompt!r}")
    task, arg = prompt[:-1].split(" ", 1)
    try:
        if task == "rev":
            return arg[::-1]
        if task == "sort":
            return "".join(sorted(arg))
        if task == "up":
            return arg.upper()
        if task == "uniq":
            return "".join(dict.fromkeys(arg))
        if task == "add":
            a, b = arg.split(" ")
            return str(int(a) + int(b))
        if task == "max":
            return str(max(int(x) for x in arg.split(" ")))
    except ValueError as e:
        raise ValueError(f"not a tiny-task prompt: {prompt!r} ({e})") from None
    raise ValueError(f"not a tiny-task prompt: unknown task {task!r} in {prompt!r}")


def gold_reward(prompt: str, response: str, finished: bool = True) -> float:
    """Hidden quality score in [0, 1] with partial credit; ``finished=False``: the response had no EOS."""
    answer = solve(prompt)
    # Lengths differ on purpose: characters past the answer are rambling, missing ones score 0.
    right = sum(a == b for a, b in zip(response, answer, strict=False)) / len(answer)
    ramble = max(0, len(response) - len(answer))
    score = right - 0.15 * ramble - (0.0 if finished else 0.3)
    return float(min(1.0, max(0.0, score)))


def gold_rewards(prompts: list[str], responses: list[str], **_) -> list[float]:
    """``gold_reward`` as an RL reward function, one score per response
    (``--config.rollout.reward_fn=gptjax.data.tiny:gold_rewards``; an unfinished response is left to
    ``rollout.missing_eos_penalty``)."""
    return [gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)]


# ----------------------------------------------------------------------------------------------------
# Noisy responses: each corruption is a plausible mistake with a different gold reward.


def _typo(rng, prompt, ans):
    i = rng.randrange(len(ans))
    pool = "0123456789" if ans.isdigit() else (LETTERS.upper() if ans.isupper() else LETTERS)
    return ans[:i] + rng.choice([c for c in pool if c != ans[i]]) + ans[i + 1 :]


def _cut(rng, prompt, ans):
    return ans[: rng.randrange(len(ans))] if len(ans) > 1 else ""


def _ramble(rng, prompt, ans):
    return ans + " " + rng.choice([ans, prompt.split(" ", 1)[0], "ok", _word(rng, 1, 4)])


def _copy(rng, prompt, ans):  # the wrong task: echo the argument
    return prompt[:-1].split(" ", 1)[1]


CORRUPTIONS: dict[str, Callable[[random.Random, str, str], str]] = {
    "typo": _typo,
    "cut": _cut,
    "ramble": _ramble,
    "copy": _copy,
}


def noisy_response(rng: random.Random, prompt: str, noise: float) -> str:
    """The answer with probability 1 - noise, else one corruption chosen uniformly."""
    ans = solve(prompt)
    if rng.random() >= noise:
        return ans
    return CORRUPTIONS[rng.choice(sorted(CORRUPTIONS))](rng, prompt, ans)


def rank_by_labeler(rng: random.Random, prompt: str, responses: list[str], temperature: float) -> list[str]:
    """Plackett-Luce ranking: repeatedly pick the best of the rest with p ~ exp(gold / temperature)."""
    rest = list(responses)
    ranked = []
    while rest:
        if temperature <= 0:
            k = max(range(len(rest)), key=lambda j: gold_reward(prompt, rest[j]))
        else:
            logits = [gold_reward(prompt, r) / temperature for r in rest]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            k = rng.choices(range(len(rest)), weights=weights)[0]
        ranked.append(rest.pop(k))
    return ranked


# ----------------------------------------------------------------------------------------------------
# Record generators (the formats of gptjax.data.sources).


def _prompts(rng: random.Random, n: int, want: Callable[[str], bool], unique: bool = True) -> list[str]:
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"tiny task: could only draw {len(out)} of {n} prompts; ask for fewer")
        p = make_prompt(rng)
        if want(p) and not (unique and p in seen):
            seen.add(p)
            out.append(p)
    return out


def _rng(seed: int, what: str) -> random.Random:
    return random.Random(f"gptjax-tiny-{seed}-{what}")  # str seeds hash with sha512: stable across runs


def text_records(seed: int, n: int, noise: float = 0.1, lines: tuple[int, int] = (3, 7)) -> list[dict]:
    """Pretraining documents: a few solved prompts per document, some with mistakes (the web is noisy)."""
    rng = _rng(seed, "text")
    docs = []
    for _ in range(n):
        ps = _prompts(rng, rng.randint(*lines), lambda p: bucket(p) != "eval", unique=False)
        docs.append({"text": "\n".join(p + noisy_response(rng, p, noise) for p in ps)})
    return docs


def sft_records(seed: int, n: int, noise: float = 0.3) -> list[dict]:
    rng = _rng(seed, "sft")
    return [
        {"prompt": p, "response": noisy_response(rng, p, noise)}
        for p in _prompts(rng, n, lambda p: bucket(p) == "sft")
    ]


def rank_records(
    seed: int, n: int, k: int = 4, temperature: float = 0.15, noise: float = 0.75, which: str = "rm"
) -> list[dict]:
    """K distinct candidate responses per prompt (mostly imperfect), ranked best -> worst by a labeler."""
    if k < 2:
        raise ValueError(f"tiny task: rank records need k >= 2 responses per prompt, got {k}")
    rng = _rng(seed, "rank-" + which)
    out = []
    for p in _prompts(rng, n, lambda p: bucket(p) == which):
        cands: list[str] = []
        for _ in range(20 * k):
            r = noisy_response(rng, p, noise)
            if r not in cands:
                cands.append(r)
            if len(cands) == k:
                break
        if len(cands) >= 2:
            out.append({"prompt": p, "responses": rank_by_labeler(rng, p, cands, temperature)})
    return out


def rm_prompts(seed: int, n: int) -> list[str]:
    """Prompts of the reward-model bucket (never evaluated on), for comparisons of a policy's samples."""
    return _prompts(_rng(seed, "rm-prompts"), n, lambda p: bucket(p) == "rm")


def label_samples(
    seed: int, prompts: list[str], samples: list[list[str]], temperature: float = 0.15
) -> tuple[list[dict], int]:
    """Rank records from a policy's own samples (iterated RLHF): each prompt's distinct samples ranked by a
    simulated labeler; prompts with fewer than 2 distinct samples cannot be compared and are counted."""
    rng = _rng(seed, "label")
    out, skipped = [], 0
    for p, cands in zip(prompts, samples, strict=True):
        distinct = list(dict.fromkeys(cands))
        if len(distinct) < 2:
            skipped += 1
            continue
        out.append({"prompt": p, "responses": rank_by_labeler(rng, p, distinct, temperature)})
    return out, skipped


def prompt_records(seed: int, n: int) -> list[dict]:
    rng = _rng(seed, "prompts")
    return [{"prompt": p} for p in _prompts(rng, n, lambda p: bucket(p) == "prompts")]


def eval_prompts(seed: int = 0, n: int = 200) -> list[str]:
    """Held-out prompts (never used for training in any stage) for gold-reward evaluation."""
    return _prompts(_rng(seed, "eval"), n, lambda p: bucket(p) == "eval")


def eval_sft_records(seed: int, n: int, noise: float = 0.0) -> list[dict]:
    """Held-out demonstrations on the eval prompts (clean by default) for validation loss."""
    rng = _rng(seed, "eval-sft")
    return [{"prompt": p, "response": noisy_response(rng, p, noise)} for p in eval_prompts(seed, n)]


def records(fmt: str, split: str, cfg) -> list[dict]:
    """All records of one format for 'train' or 'validation', from the ``data.tiny`` config section."""
    seed = cfg.seed
    if split == "train":
        if fmt == "text":
            return text_records(seed, cfg.num_docs, cfg.text_noise)
        if fmt == "sft":
            return sft_records(seed, cfg.num_sft, cfg.sft_noise)
        if fmt == "rank":
            return rank_records(seed, cfg.num_rank, cfg.num_responses, cfg.label_temperature, cfg.rank_noise)
        if fmt == "prompt":
            return prompt_records(seed, cfg.num_prompts)
    elif split == "validation":
        n = cfg.num_eval
        if fmt == "text":
            return [{"text": r["prompt"] + r["response"]} for r in eval_sft_records(seed, n)]
        if fmt == "sft":
            return eval_sft_records(seed, n)
        if fmt == "rank":
            return rank_records(seed, n, cfg.num_responses, cfg.label_temperature, cfg.rank_noise, "eval")
        if fmt == "prompt":
            return [{"prompt": p} for p in eval_prompts(seed, n)]
    raise ValueError(f"tiny task: no {fmt!r} records for split {split!r}")
