"""The rollout's samples on the host: DAPO's dynamic sampling and the sampler-vs-trainer agreement.

    first = Draw(prompts, gen, values, seconds, responses)      # one generate call's rows, scored
    draw, counts = dynamic_sampling(first, more, total, group_size, max_extra)

A group is ``rollout.samples_per_prompt`` adjacent rows: the responses to one prompt. With
``rollout.dynamic_sampling`` (DAPO), groups whose function scores all tie teach a group objective nothing:
they are dropped and replaced by groups of new prompts (up to ``max_extra_generations`` more generate calls,
the same number on every process: generation is collective); what is still missing is filled with the first
dropped groups. ``sampler_agreement`` compares generation's log-probs of the sampled tokens with the
experience pass's and gives truncated importance weights (``rollout.tis_cap``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from gptjax.model import sample


class Draw(NamedTuple):
    """One generate call's rows (or the rows a rollout keeps): prompts (each repeated in its group's rows),
    the generation, the function terms' values {term: [B]} and their seconds, and the decoded responses
    (None when no function term needed them)."""

    prompts: dict[str, np.ndarray]
    gen: sample.Generation
    values: dict[str, np.ndarray]
    seconds: dict[str, float]
    responses: list[str] | None = None


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any process (every process takes the same branch: generation is
    collective)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def tokens_generated(gen: sample.Generation) -> float:
    """The tokens a generation made on every process (rows split evenly)."""
    return float(np.sum(gen.lengths_B)) * jax.process_count()


def tied_groups(total_B: np.ndarray, group_size: int) -> np.ndarray:
    """[groups] bool: whether every score of a group of ``group_size`` adjacent rows equals its first."""
    g = total_B.reshape(-1, group_size)
    return np.all(g == g[:, :1], axis=1)


def choose_groups(tied: list[np.ndarray], groups: int) -> tuple[list[tuple[int, int]], int]:
    """The (draw, group) pairs a rollout keeps, ``groups`` of them: the informative groups (``tied`` False)
    in the order generated, then (if short) the first tied groups; and how many tied groups are kept."""
    keep, fill = [], []
    for i, tied_G in enumerate(tied):
        for g, t in enumerate(tied_G):
            (fill if t else keep).append((i, g))
    chosen = (keep + fill)[:groups]
    return chosen, sum(1 for c in chosen if c in fill)


def take_groups(draws: list[Draw], chosen: list[tuple[int, int]], group_size: int, seconds) -> Draw:
    """The ``chosen`` groups' rows of ``draws``, in order; the generation's steps are the most any draw
    took, ``seconds`` the function terms' time over every draw."""
    G = group_size

    def take(rows_of):
        return np.concatenate([rows_of(draws[i])[g * G : (g + 1) * G] for i, g in chosen])

    prompts = {k: take(lambda d, k=k: d.prompts[k]) for k in draws[0].prompts}
    fields = sample.Generation._fields[:-1]
    gen = sample.Generation(
        **{k: take(lambda d, k=k: getattr(d.gen, k)) for k in fields},
        steps=max(int(d.gen.steps) for d in draws),
    )
    values = {k: take(lambda d, k=k: d.values[k]) for k in draws[0].values}
    responses = None
    if all(d.responses is not None for d in draws):
        responses = [s for i, g in chosen for s in draws[i].responses[g * G : (g + 1) * G]]
    return Draw(prompts, gen, values, seconds, responses)


def dynamic_sampling(
    first: Draw,
    draw: Callable[[int], Draw],
    total: Callable[[dict[str, np.ndarray]], np.ndarray],
    group_size: int,
    max_extra: int,
) -> tuple[Draw, dict[str, float]]:
    """The rows a rollout keeps (module doc) and its counts: every generated token (the extra generations'
    too), the first draw's tied groups, the extra generations, the tied groups kept. ``draw(i)``: extra
    generate call i (1, 2, ...), scored; ``total(values)``: the function terms' weighted sum [B]."""
    groups = len(first.prompts["prompt_BP"]) // group_size
    draws, tied = [first], [tied_groups(total(first.values), group_size)]
    counts = {"tokens_generated": tokens_generated(first.gen)}
    seconds = first.seconds
    informative = int(np.sum(~tied[0]))
    extra = 0
    while extra < max_extra and any_process(informative < groups):
        extra += 1
        more = draw(extra)
        seconds = {k: seconds.get(k, 0.0) + v for k, v in more.seconds.items()}
        draws.append(more)
        tied.append(tied_groups(total(more.values), group_size))
        informative += int(np.sum(~tied[-1]))
        counts["tokens_generated"] += tokens_generated(more.gen)
    chosen, tied_kept = choose_groups(tied, groups)
    counts |= {
        "dynamic_sampling/tied_groups": float(int(np.sum(tied[0]))),
        "dynamic_sampling/extra_generations": float(extra),
        "dynamic_sampling/tied_groups_kept": float(tied_kept),
    }
    return take_groups(draws, chosen, group_size, seconds), counts


def sampler_agreement(
    trainer_logp_BL: np.ndarray,
    sampler_logp_BT: np.ndarray,
    prompt_lengths_B: np.ndarray,
    gen_lengths_B: np.ndarray,
    tis_cap: float = 0.0,
) -> tuple[dict[str, float], np.ndarray | None]:
    """How far the sampler's log-probs of the sampled tokens (from generation) are from the trainer's (the
    experience pass), over every sampled token: mean and max |log pi_sampler - log pi_trainer|; and, with
    ``tis_cap`` > 0, truncated importance-sampling weights min(pi_trainer / pi_sampler, tis_cap) per token
    [B, L] (1 off the sampled tokens). Response token t of row b sits at column prompt_length + t of the
    trainer's row (the layout of ``gptjax.rl.experience``)."""
    B, T = sampler_logp_BT.shape
    cols_BT = np.asarray(prompt_lengths_B)[:, None] + np.arange(T)[None, :]
    mask_BT = np.arange(T)[None, :] < np.asarray(gen_lengths_B)[:, None]
    cols_BT = np.minimum(cols_BT, trainer_logp_BL.shape[1] - 1)
    trainer_BT = np.take_along_axis(np.asarray(trainer_logp_BL, np.float64), cols_BT, axis=1)
    diff_BT = trainer_BT - np.asarray(sampler_logp_BT, np.float64)
    absdiff = np.abs(diff_BT[mask_BT])
    metrics = {
        "sampler_logp_diff_mean": float(absdiff.mean()) if absdiff.size else 0.0,
        "sampler_logp_diff_max": float(absdiff.max()) if absdiff.size else 0.0,
    }
    if not tis_cap:
        return metrics, None
    w_BT = np.where(mask_BT, np.minimum(np.exp(diff_BT), tis_cap), 1.0)
    w_BL = np.ones(trainer_logp_BL.shape, np.float32)
    rows_BT = np.broadcast_to(np.arange(B)[:, None], (B, T))
    w_BL[rows_BT[mask_BT], cols_BT[mask_BT]] = w_BT[mask_BT]
    metrics["tis_weight_mean"] = float(w_BT[mask_BT].mean()) if mask_BT.any() else 1.0
    metrics["tis_clipped_frac"] = float((np.exp(diff_BT[mask_BT]) > tis_cap).mean()) if mask_BT.any() else 0.0
    return metrics, w_BL
