"""What keeps a long run's work safe: the non-finite policy, SIGTERM/SIGINT, and a failed run's empty workdir.

The train step itself skips an update whose loss or gradients are not finite and reports ``skipped`` (see
``gptjax.train.step``); ``NonFinite`` applies ``train.nonfinite`` to the metrics the loop fetches anyway, so
the check costs no extra host sync. ``Signals`` turns SIGTERM / SIGINT into a request the loop serves after
its current step: checkpoint, then ``Interrupted`` (exit status 128 + the signal number). ``WorkdirLock``
keeps a second run off a workdir that a run is using, and ``make_workdir`` refuses one it cannot write, before
anything is built. ``Divergence`` stops a finite but exploding run before it writes a checkpoint
(``train.divergence_factor``).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import math
import os
import shutil
import signal
import socket
import statistics
import threading
from collections.abc import Callable
from typing import Any

import jax
from absl import logging

from gptjax.checkpoint import disk
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
        self.checked = 0  # steps checked since this process started

    def check(self, step: int, out: dict[str, float], where: dict | None) -> None:
        """``step``: the step's number (the train state's step after it); ``out``: its fetched metrics."""
        self.checked += 1
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

    def check_not_all_skipped(self, step: int) -> None:
        """Raise when every step this process ran, up to ``step``, was skipped: a run shorter than
        ``max_in_a_row`` would otherwise end as a success having trained nothing."""
        if self.checked and self.in_a_row == self.checked:
            raise FloatingPointError(
                f"steps {step - self.checked + 1}..{step}: all {self.checked} steps this run made had "
                "non-finite loss or gradients and were skipped (train.nonfinite='skip'): nothing was "
                f"trained, and the checkpoint of step {step} is not written. Lower optim.lr (or "
                "optim.clip_norm), or inspect the data"
            )

    def row(self) -> dict[str, float]:
        """``skipped``: steps skipped since the last logged row (the row's own step included)."""
        n, self.since_row = self.since_row, 0
        return {"skipped": float(n)}


class Diverged(FloatingPointError):
    """A finite but exploding step (``train.divergence_factor``): the run stops before its next save."""


class Divergence:
    """``train.divergence_factor``: stop at a step whose loss or update norm is more than ``factor`` times
    its median over the last ``window`` checked steps, or whose update is about as large as the params it
    changes (that one needs no history, so the first step of a run is guarded too). 0 turns the guard off.

    It reads the metrics the loop fetches anyway and raises before the step's checkpoint is written. A step's
    loss is measured before its update, so an update whose damage shows only in the loss (its norm looks
    normal) is seen one step late: at a save step that is after the checkpoint. So before each save the loop
    measures the loss of the params it is about to write on the step's own batch (``check_saved``, one
    forward pass per checkpoint): no diverged state is saved, and rotation keeps every checkpoint from
    before it. Losses are compared only while every loss in the window is positive (cross-entropy, ranking,
    DPO): an RL objective's loss crosses zero, and a ratio to a median near zero means nothing. Skipped
    (non-finite) steps are left to ``NonFinite``.
    """

    MIN_HISTORY = 3  # steps in the window before a spike is judged against it
    ADVICE = (
        "Stopped before writing another checkpoint: the checkpoints kept are all from before this step. "
        "Resume from the last one with a lower optim.lr (or a smaller optim.clip_norm), or raise "
        "train.divergence_factor (0 turns this check off) if such a spike is expected"
    )

    def __init__(self, factor: float, window: int):
        self.factor, self.window = factor, window
        self.losses: list[float] = []
        self.updates: list[float] = []

    def check(self, step: int, out: dict[str, float]) -> None:
        """``step``: the step's number (the train state's step after it); ``out``: its fetched metrics."""
        if not self.factor or out.get("skipped"):
            return
        loss, update, params = out.get("loss"), out.get("update_norm"), out.get("param_norm")
        problems = []
        # param_norm is measured after the update: above half of it, the update is at least a third of the
        # params it changed (a normal step's is below 2% on the tiny configs)
        if update is not None and params and update > params / 2:
            problems.append(
                f"update_norm={update:.4g} is more than half of param_norm={params:.4g} after it (an update "
                "as large as the params themselves)"
            )
        if len(self.updates) >= self.MIN_HISTORY and update is not None:
            median = statistics.median(self.updates)
            if median > 0 and update > self.factor * median:
                problems.append(self._spike("update_norm", update, median, len(self.updates)))
        if len(self.losses) >= self.MIN_HISTORY and loss is not None and min(self.losses) > 0:
            median = statistics.median(self.losses)
            if loss > self.factor * median:
                problems.append(self._spike("loss", loss, median, len(self.losses)))
        if problems:
            raise Diverged(f"step {step}: the run diverged: {'; '.join(problems)}. {self.ADVICE}")
        for seq, x in ((self.losses, loss), (self.updates, update)):
            if x is not None:
                seq.append(x)
                del seq[: -self.window]

    def judges_loss(self) -> bool:
        """Whether ``check_saved`` would judge a loss now (the loop measures one only then)."""
        return bool(self.factor) and bool(self.losses) and min(self.losses) > 0

    def check_saved(self, step: int, loss: float) -> None:
        """Before step ``step``'s checkpoint: raise when ``loss``, that of the params about to be saved on the
        step's own batch, is not finite or is more than ``factor`` times the window's median. One loss in the
        window is enough: it holds the same batch's loss before the update."""
        median = statistics.median(self.losses)
        if math.isfinite(loss) and loss <= self.factor * median:
            return
        ratio = f"{loss / median:.3g}x" if math.isfinite(loss) else "not finite, against"
        raise Diverged(
            f"step {step}: the run diverged: the params after this step's update have loss={loss:.4g} on "
            f"the step's own batch, {ratio} its median {median:.4g} over the last {len(self.losses)} steps "
            f"(train.divergence_factor={self.factor:g}); the step's own numbers did not show it. Its "
            f"checkpoint is not written. {self.ADVICE}"
        )

    def _spike(self, name: str, value: float, median: float, n: int) -> str:
        return (
            f"{name}={value:.4g} is {value / median:.3g}x its median {median:.4g} over the last {n} steps "
            f"(train.divergence_factor={self.factor:g})"
        )


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


LOCK_NAME = "run.lock"  # in the workdir, beside checkpoints/ and metrics.jsonl (neither reads it)
# what a run writes in its workdir, besides new files there: folders it adds files to, files it appends to
WRITTEN_FOLDERS = ("checkpoints", "checkpoints-damaged", "tb")
APPENDED = ("metrics.jsonl",)


def make_workdir(workdir: str) -> bool:
    """Create ``workdir`` if needed; raise ``disk.NotWritable`` (one line naming the path and the fix) when
    this process cannot write it or a folder or file in it the run writes: a read-only mount, another
    owner. Before anything is built, instead of a traceback at the first checkpoint. Returns whether it
    was created."""
    return disk.make_writable_dir(workdir, WRITTEN_FOLDERS, APPENDED)


class WorkdirLocked(RuntimeError):
    """Another live run holds the workdir's lock."""


class WorkdirLock:
    """The run's hold on its workdir: process 0 takes it for the whole run; a second run is refused at once,
    naming the holder (pid, host, start time).

    ``fcntl.flock`` on ``<workdir>/run.lock``, not an O_EXCL-created file: the OS drops a flock when its
    process dies however it dies (SIGKILL, OOM, a lost machine's reboot), so a lock file nobody holds is by
    definition stale and is taken over with a message, with no pid-liveness guesses (pids are reused, and a
    pid on another host cannot be checked). The file holds the holder's JSON, only to be named in errors.
    Other processes of a multi-process run hold nothing: if process 0 is refused, it exits and JAX's
    coordination service stops the others.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
        self.fd: int | None = None

    def acquire(self) -> WorkdirLock:
        if jax.process_index() != 0:
            return self
        for _ in range(10):  # the file may be removed by a holder releasing it between our open and flock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ValueError(
                    f"--workdir {os.path.dirname(self.path)!r} is not writable ({e.strerror}): a run writes "
                    "its lock, checkpoints and metrics there; choose a writable path"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise WorkdirLocked(self._refusal()) from None
                # a file system without locks (some network mounts): run, but say that nothing guards it
                logging.warning("%s: cannot be locked (%s); nothing keeps a second run off it", self.path, e)
                return self
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a file that is gone: try the one now at the path
        else:
            raise WorkdirLocked(f"{self.path}: could not take the lock (it keeps being replaced)")
        self.fd = fd
        previous = _holder(os.pread(fd, 4096, 0))
        if previous:
            logging.warning(
                "%s: took over the lock left by %s, which no longer runs (it stopped without releasing it)",
                self.path,
                _describe_holder(previous),
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.remove(self.path)  # before unlocking: no one can lock a file that is about to vanish
        except FileNotFoundError:  # e.g. a failed run's empty workdir was removed
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def _refusal(self) -> str:
        try:
            with open(self.path, "rb") as f:
                holder = _holder(f.read(4096))
        except OSError:
            holder = None
        who = _describe_holder(holder) if holder else "a run that is starting"
        return (
            f"workdir {os.path.dirname(self.path)} is in use by another run: {who} holds {self.path}. Wait "
            "for that run to end (or stop it), or pass another --workdir"
        )

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(raw: bytes) -> dict | None:
    try:
        holder = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe_holder(h: dict) -> str:
    return f"pid {h.get('pid', '?')} on host {h.get('host', '?')} (started {h.get('started', '?')})"
