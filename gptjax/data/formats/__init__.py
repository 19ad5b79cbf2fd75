"""Batch formats: one unit per kind of batch the data layer serves, found by name.

A format is named after the stage that first reads it: ``pretrain`` (raw text, packed), ``sft``
(demonstrations, packed, no loss on prompts), ``rm`` (K ranked responses per prompt) and ``prompts`` (prompts
for RL). The names are the public ``stage=`` of ``gptjax.data.make_iterator``, the ``stage`` of an iterator's
saved state and an objective's ``data``, so they stay; each module is named like its format. Its
``FORMAT = Format(...)`` declares in one place everything the loader, converter, pipeline and planner need:

    record, parse   its own record format (a source's ``format=``) and how a raw record becomes one
    feeds           the other record formats it can read and how such a record becomes its own
                    (rankings give SFT their best response; demonstrations and rankings give RL prompts)
    tokenize        records -> token items, one per record (None where the overflow policy drops it)
    overflow        what ``data.overflow='auto'`` means for it, and the policies it accepts
    batcher         items -> fixed-shape numpy batches, with a resumable position (consumed, offset)
    shapes          its batch's {key: (shape, dtype)} for (batch size, seq len, config.data): the planner's

    fmt = gptjax.data.formats.get("rm")
    fmt.shapes(8, 256, config.data)     # {'tokens_BKL': ((8, K, 256), int32), ...}

A new format is its own module here plus its name in ``NAMES`` (the table that also names the stages a
source may feed); nothing else in the data layer or the planner names a format.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

# The one table of batch formats: each is the module gptjax.data.formats.<name>.
NAMES = ("pretrain", "sft", "rm", "prompts")

Shapes = dict[str, tuple[tuple[int, ...], Any]]  # key -> (shape, numpy dtype)


class Batcher(Protocol):
    """Makes one fixed-shape batch per call from a stream of item ids; ``consumed`` (items finished) and
    ``offset`` (how far into a partly used item) are its position, restored by ``reset``."""

    consumed: int
    offset: int

    def reset(self, consumed: int, offset: int) -> None: ...

    def batch(self, pull: Callable[[], int]) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class Format:
    """One batch format's declaration (module doc)."""

    name: str
    what: str  # how messages name its data: 'pretraining', 'demonstrations', ...
    record: str  # its own record format: a source's ``format``
    # (raw: dict, fields, where: str, render_chat, counts) -> a canonical record of ``record``, or None
    parse: Callable[..., dict | None]
    # (records, vocab, seq_len, overflow, counts) -> items, None where the overflow policy drops a record
    tokenize: Callable[..., list]
    # (items, *, batch_size, seq_len, pad_id, data_cfg, overflow, counts) -> Batcher
    batcher: Callable[..., Batcher]
    shapes: Callable[..., Shapes]  # (batch_size, seq_len, data_cfg) -> Shapes
    feeds: Mapping[str, Callable[[dict], dict]] = dataclasses.field(default_factory=dict)
    overflow: str = "truncate"  # what data.overflow='auto' means
    overflows: tuple[str, ...] = ("truncate", "drop")

    @property
    def records(self) -> tuple[str, ...]:
        """The record formats that can feed it, its own first."""
        return (self.record, *self.feeds)

    def convert(self, rec: dict, record_format: str) -> dict:
        """A canonical record of ``record_format`` as this format's record."""
        return rec if record_format == self.record else self.feeds[record_format](rec)

    def overflow_policy(self, policy: str) -> str:
        """``data.overflow`` resolved for this format ('auto' -> its default); refuses one it cannot apply."""
        if policy == "auto":
            return self.overflow
        if policy not in self.overflows:
            users = " and ".join(f.what for f in map(get, NAMES) if policy in f.overflows)
            raise ValueError(f"data.overflow={policy!r} is for {users} only, not stage {self.name!r}")
        return policy


def get(name: str) -> Format:
    """The format ``name`` (one of ``NAMES``)."""
    if name not in NAMES:
        raise ValueError(f"unknown data format {name!r}; known formats: {NAMES}")
    return importlib.import_module(f"{__name__}.{name}").FORMAT


def of_record(record_format: str) -> Format | None:
    """The format whose own record format is ``record_format``, or None."""
    return next((f for f in map(get, NAMES) if f.record == record_format), None)
