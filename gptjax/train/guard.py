"""What keeps a long run's work safe: the non-finite policy, SIGTERM/SIGINT, and a failed run's empty workdir.

The train step itself skips an update whose loss or gradients are not finite and reports ``skipped`` (see
``gptjax.train.step``); ``NonFinite`` applies ``train.nonfinite`` to the metrics the loop fetches anyway, so
the check costs no extra host sync. ``Signals`` turns SIGTERM / SIGINT into a request the loop serves after
its current step: checkpoint, then ``Interrupted`` (exit status 128 + the signal number).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from collections.abc import Callable
from typing import Any

from absl import logging

from gptjax.train import sources

POLICIES = ("skip", "stop")


def position(source) -> dict | None:
    """Where the source's next batch comes from: ``source.position()`` when it has one (it is called every
    step, so it must be cheap), a data iterator's state, or None when the source cannot say."""
    fn = getattr(source, "position", None)
    if fn is not None:
        return fn()
    if isinstance(source, sources.DataSource):
        return source.get_state()
    return None


def _describe(where: dict | None) -> str:
    if where is None:
        return "a batch source that reports no position"
    return "source position " + json.dumps(where, sort_keys=True, default=str)


class NonFinite:
    """``train.nonfinite``: 'skip' logs each skipped step and stops after ``max_in_a_row`` of them in a row
    (counted since this process started); 'stop' stops at the first one, naming its step and batch."""

    def __init__(self, policy: str, max_in_a_row: int):
        self.policy, self.max_in_a_row = policy, max_in_a_row
        self.in_a_row = 0
        self.since_row = 0

    def check(self, step: int, out: dict[str, float], where: dict | None) -> None:
        """``step``: the step's number (the train state's step after it); ``out``: its fetched metrics."""
        if not out.get("skipped"):
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.since_row += 1
        what = (
            f"step {step}: non-finite loss or gradients (loss={out.get('loss')}, "
            f"grad_norm={out.get('grad_norm')}) on the batch read at {_describe(where)}"
        )
        if self.policy == "stop":
            raise FloatingPointError(
                f"{what}. train.nonfinite='stop': stopped without saving; the last checkpoint is from before "
                "this step. Inspect that batch, or set train.nonfinite='skip' to skip such steps"
            )
        logging.warning("%s: update skipped (%d in a row)", what, self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise FloatingPointError(
                f"steps {step - self.in_a_row + 1}..{step}: non-finite loss or gradients {self.in_a_row} "
                f"times in a row (train.max_nonfinite_in_a_row={self.max_in_a_row}); the last: {what}. The "
                "run has diverged: its checkpoints hold only finite states; resume from the last one with a "
                "lower optim.lr (or a smaller optim.clip_norm)"
            )

    def row(self) -> dict[str, float]:
        """``skipped``: steps skipped since the last logged row (the row's own step included)."""
        n, self.since_row = self.since_row, 0
        return {"skipped": float(n)}


class Interrupted(SystemExit):
    """A run stopped by SIGTERM / SIGINT after writing its checkpoint; exits 128 + the signal number."""

    def __init__(self, signum: signal.Signals, step: int, path: str):
        super().__init__(128 + signum)
        self.signum, self.step = signum, step
        self.message = (
            f"{signum.name}: stopped after step {step} and wrote its checkpoint {path}; run the same command "
            f"again to resume from step {step}"
        )

    def __str__(self) -> str:
        return self.message


class Signals:
    """While entered, SIGTERM and SIGINT are noted (the loop finishes its step, checkpoints and stops); a
    second one stops at once. Handlers go in from the main thread only. With several processes, SIGTERM is
    left to JAX's preemption notice, ``preempted(step)`` (orbax's ``reached_preemption``), which every
    process answers alike at the same step."""

    def __init__(self, preempted: Callable[[int], bool] | None = None):
        self.received: int | None = None
        self.preempted = preempted
        self.wanted = (signal.SIGINT,) if preempted else (signal.SIGTERM, signal.SIGINT)
        self.previous: dict[int, Any] = {}

    def stop_after(self, step: int) -> signal.Signals | None:
        """The signal to stop for after ``step``, if any."""
        if self.received is not None:
            return signal.Signals(self.received)
        if self.preempted is not None and self.preempted(step):
            return signal.SIGTERM
        return None

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in self.wanted}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # asked twice: do what the signal did before
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received = signum
        logging.warning(
            "%s: finishing this step, then writing a checkpoint and stopping (send it again to stop at once)",
            signal.Signals(signum).name,
        )


def remove_unused_workdir(workdir: str) -> None:
    """Remove a workdir this run created when the run failed before a checkpoint or a metrics row."""
    ckpts = os.path.join(workdir, "checkpoints")
    metrics = os.path.join(workdir, "metrics.jsonl")
    if os.path.isdir(ckpts) and os.listdir(ckpts):
        return
    if os.path.isfile(metrics) and os.path.getsize(metrics):
        return
    shutil.rmtree(workdir, ignore_errors=True)
    logging.info("removed %s: the run failed before its first step and it holds nothing", workdir)
