"""What each training stage is: its data format, default loss, head, frozen roles and batch source.

A stage is a loss file + a batch source + a config (DESIGN.md §1); this table is where a new stage is
declared.
``data`` names the data layer's batch format (``gptjax.data``: 'pretrain' | 'sft' | 'rm' | 'prompts'), so the
train loop never passes the stage name itself to the data layer.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Stage:
    data: str  # the data layer's batch format the source reads
    loss: str  # default config.loss.name (a module of gptjax.losses, or a dotted module path)
    head: str = "lm"  # the trained model's head: 'lm' | 'scalar'
    frozen: tuple[str, ...] = ()  # frozen roles the loss reads from ctx.frozen
    source: str = "data"  # 'data': a data iterator (gptjax.train.sources) | 'rollout': gptjax.rl.rollout (RL)
    # 'module:function' run on the train state before the final checkpoint: f(config, state, ctx, mesh) ->
    # (state, metrics), e.g. the reward model's normalisation
    finish: str = ""
    # 'module:function' run before anything is built: f(config, workdir) -> config, e.g. rejection
    # sampling's demonstrations written to the workdir and named as the stage's data
    prepare: str = ""


STAGES: dict[str, Stage] = {
    "pretrain": Stage(data="pretrain", loss="lm"),
    "sft": Stage(data="sft", loss="lm"),
    "rm": Stage(data="rm", loss="ranking", head="scalar", finish="gptjax.rl.reward:normalize_state"),
    "dpo": Stage(data="rm", loss="dpo", frozen=("ref",)),
    # rejection sampling: SFT on the reward model's best of n samples per prompt (gptjax.rl.bon)
    "bon": Stage(data="sft", loss="lm", prepare="gptjax.rl.bon:prepare_demonstrations"),
    "ppo": Stage(data="prompts", loss="ppo", frozen=("ref", "reward"), source="rollout"),
    # Group objectives on the same rollouts: no critic, advantages from each prompt's group of responses
    "grpo": Stage(data="prompts", loss="grpo", frozen=("ref", "reward"), source="rollout"),
    "rloo": Stage(data="prompts", loss="rloo", frozen=("ref", "reward"), source="rollout"),
}


def get(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"config.stage={name!r} is unknown; stages: {sorted(STAGES)}")
    return STAGES[name]


def finish_fn(stage: Stage):
    """The stage's finishing function, or None."""
    return _function(stage.finish)


def prepare_fn(stage: Stage):
    """The stage's preparing function, or None."""
    return _function(stage.prepare)


def _function(spec: str):
    if not spec:
        return None
    import importlib

    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)
