"""Batch sources: where the train loop's batches come from.

    source = make_source(config, stage, batch_size=..., split="train")
    batch = source.next(train_state)       # a source may look at the train state (rollouts sample from it)
    state = source.get_state()             # JSON-serialisable; saved with every checkpoint
    source.set_state(state)                # a resumed run continues from the same position

Data stages read a data iterator of the stage's batch format (``gptjax.train.stages``); PPO's rollout source
(generate with the current policy, score, KL, GAE) implements the same three methods.
"""

from __future__ import annotations

from typing import Any

from gptjax import data
from gptjax.rl.rollout import RolloutSource
from gptjax.train.stages import Stage


class DataSource:
    """Batches of a ``gptjax.data`` iterator; the train state is not needed."""

    def __init__(self, iterator):
        self.iterator = iterator

    def next(self, train_state: Any = None) -> dict:
        del train_state
        return next(self.iterator)

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, state: dict) -> None:
        self.iterator.set_state(state)


def make_source(
    config,
    stage: Stage,
    *,
    batch_size: int,
    split: str = "train",
    ctx=None,
    mesh=None,
    prompts=None,
    ptx=None,
):
    """The stage's source over ``config.data`` (per-host ``batch_size``); rollouts need ctx and mesh
    (``prompts`` / ``ptx``: iterators replacing the rollout's own, e.g. a benchmark's synthetic prompts)."""
    if stage.source == "rollout":
        return RolloutSource(config, batch_size=batch_size, ctx=ctx, mesh=mesh, prompts=prompts, ptx=ptx)
    if stage.source != "data":
        raise ValueError(f"batch source {stage.source!r} is not available in this version")
    return DataSource(
        data.make_iterator(
            config.data,
            stage=stage.data,
            batch_size=batch_size,
            seq_len=config.train.seq_len,
            seed=config.train.seed,
            split=split,
        )
    )
