"""The stage table: each stage names its objective (the default ``config.loss.name``), its batch source, the
trained model's head and optional prepare / finish functions. Everything else about the loss (its data
format, frozen roles, critic, group size, KL placement, options) is the objective's own declaration
(``gptjax.losses.Objective``), so a new objective is its loss file plus one line here.
"""

from __future__ import annotations

import dataclasses
import importlib

from gptjax import losses


@dataclasses.dataclass(frozen=True)
class Stage:
    loss: str  # default config.loss.name (a module of gptjax.losses, or a dotted module path)
    head: str = "lm"  # the trained model's head: 'lm' | 'scalar'
    source: str = "data"  # 'data': a data iterator (gptjax.train.sources) | 'rollout': gptjax.rl.rollout (RL)
    # which of the objective's data formats the stage reads, when not its first (SFT's demonstrations)
    reads: str = ""
    # 'module:function' run on the train state before the final checkpoint: f(config, state, ctx, mesh) ->
    # (state, metrics), e.g. the reward model's normalisation
    finish: str = ""
    # 'module:function' run before anything is built: f(config, workdir) -> config, e.g. rejection
    # sampling's demonstrations written to the workdir and named as the stage's data
    prepare: str = ""
    # frozen roles this run does without, e.g. the reward model of an RL run whose reward is all functions
    # (rollout.rm_weight=0): never loaded
    unused: tuple[str, ...] = ()

    @property
    def objective(self) -> losses.Objective:
        return losses.objective(self.loss)

    @property
    def data(self) -> str:
        """The data layer's batch format the source reads ('pretrain' | 'sft' | 'rm' | 'prompts')."""
        formats = self.objective.data
        if self.reads and self.reads not in formats:
            raise ValueError(f"loss {self.loss!r} reads {formats}, not the stage's {self.reads!r} batches")
        return self.reads or formats[0]

    @property
    def frozen(self) -> tuple[str, ...]:
        """The frozen roles the objective reads from ctx.frozen (less those the run does without)."""
        return tuple(name for name in self.objective.frozen if name not in self.unused)


STAGES: dict[str, Stage] = {
    "pretrain": Stage(loss="lm"),
    "sft": Stage(loss="lm", reads="sft"),
    "rm": Stage(loss="ranking", head="scalar", finish="gptjax.rl.reward:normalize_state"),
    "dpo": Stage(loss="dpo"),
    "kto": Stage(loss="kto"),
    # rejection sampling: SFT on the reward model's best of n samples per prompt (gptjax.rl.bon)
    "bon": Stage(loss="lm", reads="sft", prepare="gptjax.rl.bon:prepare_demonstrations"),
    "ppo": Stage(loss="ppo", source="rollout"),
    # Critic-free objectives on the same rollouts: their advantages come from the objective
    "grpo": Stage(loss="grpo", source="rollout"),
    "dr_grpo": Stage(loss="dr_grpo", source="rollout"),
    "dapo": Stage(loss="dapo", source="rollout"),
    "rloo": Stage(loss="rloo", source="rollout"),
    "gspo": Stage(loss="gspo", source="rollout"),
    "reinforce_pp": Stage(loss="reinforce_pp", source="rollout"),
}


def get(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"config.stage={name!r} is unknown; stages: {sorted(STAGES)}")
    return STAGES[name]


def of_config(config) -> Stage:
    """``config.stage``'s stage with ``config.loss.name`` as its objective (a loss other than the stage's
    default brings its own data format and frozen roles; an RL run with ``rollout.rm_weight=0`` loads no
    reward model)."""
    stage = get(config.stage)
    if stage.source == "rollout" and config.get("rollout") and not config.rollout.get("rm_weight", 1.0):
        stage = dataclasses.replace(stage, unused=("reward",))  # every reward term is a function
    name = config.loss.name
    if name == stage.loss:
        return stage
    stage = dataclasses.replace(stage, loss=name)
    if stage.objective.rl != (stage.source == "rollout"):
        raise ValueError(
            f"config.loss.name={name!r} reads {stage.objective.data}: stage {config.stage!r} (source "
            f"{stage.source!r}) cannot feed it"
        )
    _ = stage.data  # refuses a loss that cannot read the stage's data format
    return stage


def finish_fn(stage: Stage):
    """The stage's finishing function, or None."""
    return _function(stage.finish)


def prepare_fn(stage: Stage):
    """The stage's preparing function, or None."""
    return _function(stage.prepare)


def _function(spec: str):
    if not spec:
        return None
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)
