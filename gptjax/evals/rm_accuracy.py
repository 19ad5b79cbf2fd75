"""Reward-model accuracy: on held-out rankings (prompt, K responses best -> worst), the fraction of pairs the
scalar-head model orders like the labels, the reward's mean and spread, and with a gold reward the fraction
of pairs (gold not tied) it orders like the gold; with demonstrations, their mean score (0 after the RM
stage's normalisation).

The rankings are the run's validation 'rank' records (the tiny task's when its data is the tiny task); the
model scores as the run trained it (``loss.reward_at``) at ``train.seq_len``.
"""

from __future__ import annotations

import collections
from typing import Any

from ml_collections import FrozenConfigDict

from gptjax.data import pipeline, tiny
from gptjax.evals.gold import gold_of
from gptjax.evals.unit import Evaluator, Inputs
from gptjax.losses.ctx import Ctx
from gptjax.rl import reward


def held_out(inputs: Inputs) -> list[tuple[str, list[str]]]:
    """(prompt, responses) of the run's validation rankings."""
    data_cfg = inputs.config.data
    if "tiny" in data_cfg:
        records = tiny.records("rank", "validation", data_cfg.tiny)
    else:
        counts: dict = collections.defaultdict(collections.Counter)
        per_source = pipeline.load_records(data_cfg, "rm", "validation", inputs.vocab, counts)
        records = [r for name in sorted(per_source) for r in per_source[name]]
    return [(r["prompt"], r["responses"]) for r in records]


def rm_accuracy(inputs: Inputs, opts) -> dict[str, Any]:

    if inputs.config is None:
        raise ValueError(
            "rm_accuracy reads its rankings and settings from the run config: give Inputs.config"
        )
    run = inputs.config
    cfg, params = inputs.model("scalar")
    ctx = Ctx(model_cfg=cfg, loss_cfg=FrozenConfigDict(run.loss))
    seq_len = opts.seq_len or run.train.seq_len
    rankings = held_out(inputs)[: opts.examples]
    gold = None if opts.gold == "none" else gold_of(opts)
    out = reward.evaluate_rm(ctx, params, inputs.vocab, rankings, seq_len, gold)
    if opts.demos and run.get("normalize") is not None:
        demos = reward.demonstrations(run.normalize.data, inputs.vocab, opts.demos)
        scores = reward.score(ctx, params, inputs.vocab, demos, seq_len)
        out["demo_reward_mean"] = float(sum(float(s[0]) for s in scores) / len(scores))
    return out


EVALUATOR = Evaluator(
    fn=rm_accuracy,
    head="scalar",
    options={
        "examples": 200,  # held-out rankings (prompts)
        "gold": "",  # 'module:function' gold(prompt, response); '': the tiny task's; 'none': no agreement
        "demos": 256,  # demonstrations scored (config.normalize.data; 0: none)
        "seq_len": 0,  # 0: the run's train.seq_len
    },
)
