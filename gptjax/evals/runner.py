"""The loop's evaluators: ``config.evals``, one entry per evaluator with its cadence.

    c.evals.gold = evals.entry("gold", every=20, samples=2, ref="@ref")    # every 20 steps and at the end
    c.evals.mine = evals.entry("mypkg.checks:accuracy", threshold=0.5)     # every=0: at the end only

An entry is ``fn`` (a built-in name or 'module:function'; default: the entry's name), ``every`` (steps; 0 =
only at the end), ``role`` / ``ema`` (which trained model and whether its EMA weights; default: the first
role with the evaluator's head) and the evaluator's options. The loop runs the due ones after a step's
dispatch (after the stage's finishing touch on the last step, so an RM is measured normalised), logs each
as split 'eval/<name>' (metrics.jsonl, TensorBoard) and writes the last values into ``results.json`` in the
workdir under 'evals', keeping its other keys. Evaluators read the train state and never change it, and
draw their keys from their own options, never from the training stream: a run trains the same numbers with
or without them (and a resume is exact either way).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
from ml_collections import ConfigDict, FrozenConfigDict

from gptjax.evals.unit import Evaluator, Inputs, evaluator, numbers
from gptjax.losses.ctx import full_params

RESULTS = "results.json"


def entry(fn: str, every: int = 0, *, role: str = "", ema: bool = False, **opts) -> ConfigDict:
    """A config.evals entry with every option of the evaluator written out (so ``--config.evals.<name>.<opt>``
    can set each from the command line)."""
    ev = evaluator(fn, "evals.entry")
    filled = ev.options_of(opts, f"evals.entry({fn!r})").as_configdict().to_dict()
    return ConfigDict({"fn": fn, "every": every, "role": role, "ema": ema, **filled})


@dataclasses.dataclass(frozen=True)
class Scheduled:
    name: str
    evaluator: Evaluator
    opts: FrozenConfigDict
    every: int
    role: str = ""
    ema: bool = False

    def due(self, step: int, total: int) -> bool:
        return step == total or (self.every > 0 and step % self.every == 0)


def configured(config: ConfigDict) -> list[Scheduled]:
    """The config's evaluators, checked: an unknown evaluator or option is an error naming its key."""
    section = config.get("evals") if "evals" in config else None
    out = []
    for name, e in (section or {}).items():
        where = f"config.evals.{name}"
        if not isinstance(e, Mapping | ConfigDict):
            raise ValueError(f"{where}: an entry is a dict (evals.entry(fn, every=..., ...)), not {e!r}")
        ev = evaluator(e.get("fn") or name, f"{where}.fn")
        every = e.get("every", 0)
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"{where}.every={every!r}: steps between evaluations, >= 0 (0: at the end only)")
        opts = ev.options_of(e, where)
        out.append(Scheduled(name, ev, opts, every, e.get("role", ""), bool(e.get("ema", False))))
    return out


def read_results(workdir: str) -> dict:
    path = os.path.join(workdir, RESULTS)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        try:
            out = json.load(f)
        except json.JSONDecodeError:
            return {}
    return out if isinstance(out, dict) else {}


def merge_results(workdir: str, updates: dict) -> dict:
    """Merge ``updates`` into the workdir's results.json (dict values one level deep), atomically."""
    results = read_results(workdir)
    for k, v in updates.items():
        results[k] = {**results[k], **v} if isinstance(v, dict) and isinstance(results.get(k), dict) else v
    path = os.path.join(workdir, RESULTS)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    return results


class Runner:
    """The run's scheduled evaluators: ``after_step`` runs the due ones, logs them and saves the last."""

    def __init__(self, config: ConfigDict, workdir: str, run: Any, rng: jax.Array):
        self.scheduled = configured(config)
        self.config, self.workdir, self.run, self.rng = config, workdir, run, rng
        self.total = config.train.steps

    def inputs(self, step: int, state: Any, ctx: Any) -> Inputs:
        names = tuple(r.name for r in self.run.roles)
        # LoRA roles: adapters (the EMA's too) on their frozen base
        params = full_params(state.params, ctx)
        ema = {} if state.ema_params is None else full_params(state.ema_params, ctx)
        if self.run.keyed:  # copies: the frozen roles join them below, never the train state's own dict
            params, ema = dict(params), dict(ema)
        else:
            params, ema = {names[0]: params}, ({names[0]: ema} if ema else {})
        params.update(ctx.frozen_models())
        return Inputs(
            step=step,
            cfgs=dict(ctx.role_cfgs + ctx.frozen_cfgs),
            params=params,
            vocab=self.run.vocab,
            config=self.config,
            ema_params=ema,
            trained=names,
            mesh=self.run.mesh,
            workdir=self.workdir,
            rng=jax.random.fold_in(self.rng, step),
        )

    def after_step(self, step: int, state: Any, ctx: Any, log: Any) -> dict[str, dict[str, float]]:
        """Run the evaluators due at ``step`` (1-based), log them; at the last step save them."""
        due = [s for s in self.scheduled if s.due(step, self.total)]
        if not due:
            return {}
        # the step that made ``state`` is finished before anything reads it (its inputs were donated)
        state = jax.block_until_ready(state)
        inputs = self.inputs(step, state, ctx)
        out = {}
        for i, s in enumerate(due):
            start = time.perf_counter()
            mine = dataclasses.replace(inputs, rng=jax.random.fold_in(inputs.rng, i))
            if s.role or s.ema:  # the entry's choice of model: put first among the trained roles
                mine = _choose(mine, s)
            out[s.name] = numbers(s.evaluator.fn(mine, s.opts))
            log.write(step, {**out[s.name], "eval_s": time.perf_counter() - start}, f"eval/{s.name}")
        if step == self.total and jax.process_index() == 0:
            merge_results(self.workdir, {"evals": {k: {"step": step, **v} for k, v in out.items()}})
        return out


def _choose(inputs: Inputs, s: Scheduled) -> Inputs:
    """Inputs whose first trained role is the entry's ``role`` (its EMA weights with ``ema``)."""
    heads = [r for r in inputs.trained if inputs.cfgs[r].head == s.evaluator.head]
    role = s.role or (heads or list(inputs.trained))[0]
    cfg, params = inputs.model(role=role, ema=s.ema)
    return dataclasses.replace(
        inputs,
        params={**inputs.params, role: params},
        cfgs={**inputs.cfgs, role: cfg},
        trained=(role, *(r for r in inputs.trained if r != role)),
    )
