"""What a run's writes meet on disk, each as one line naming the path and the fix: a folder or file it cannot
write (``NotWritable``: a read-only mount, another owner), a full disk (``DiskFull``), and too little free
space for one checkpoint before training starts (``check_space``).

The checks try what the run will do (create a file, open one for appending) instead of reading permission
bits: those say nothing for root, for a read-only mount or for an ACL. The checkpoint library's own logs of
such a failure (several tracebacks from its writer threads) are left out (``leave_out_library_logs``): the
one line raised here says it.
"""

from __future__ import annotations

import contextlib
import errno
import logging as py_logging
import os
import re
import shutil
import socket
from typing import Any

import jax
from absl import logging

_DENIED = (errno.EACCES, errno.EPERM)


def _fix(e: OSError) -> str:
    if e.errno == errno.EROFS:
        return "its file system is mounted read-only: remount it read-write, or choose another --workdir"
    if e.errno in _DENIED:
        return f"uid {os.getuid()} may not write there: fix its owner or mode, or choose another --workdir"
    if e.errno == errno.ENOSPC:
        return "the disk is full: free some space, or choose another --workdir"
    return "choose another --workdir"


class NotWritable(OSError, ValueError):
    """A path a run writes that this process cannot write. An ``OSError`` (its ``errno`` is the cause's) and
    a ``ValueError``, as the other errors about a bad ``--workdir`` are."""

    def __init__(self, message: str, cause: OSError):
        super().__init__(message)
        self.errno, self.strerror, self.filename = cause.errno, cause.strerror, cause.filename

    def __str__(self) -> str:
        return self.args[0]


def _uncreatable(workdir: str, e: OSError) -> NotWritable:
    parent = os.path.dirname(os.path.abspath(workdir))
    while parent != os.path.dirname(parent) and not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        reason = f"{parent} is a file, not a folder; choose another --workdir"
    elif e.errno in _DENIED + (errno.EROFS,):
        reason = f"its parent folder {parent} is not writable: {_fix(e)}"
    else:
        reason = _fix(e)
    return NotWritable(f"--workdir {workdir!r} cannot be created ({e.strerror}): {reason}", e)


def make_writable_dir(workdir: str, folders: tuple[str, ...] = (), appended: tuple[str, ...] = ()) -> bool:
    """Create ``workdir`` if needed, then check that this process can create files in it and in those of
    its ``folders`` that exist, and append to those of its ``appended`` files that exist; raise
    ``NotWritable`` (one line) at the first that it cannot. Returns whether ``workdir`` was created."""
    created = not os.path.exists(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise _uncreatable(workdir, e) from None
    probe = f".write-probe-{socket.gethostname()}-{os.getpid()}"
    for folder in (workdir, *(os.path.join(workdir, f) for f in folders)):
        if folder != workdir and not os.path.isdir(folder):
            continue
        path = os.path.join(folder, probe)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
            os.remove(path)
        except OSError as e:
            if created:
                shutil.rmtree(workdir, ignore_errors=True)
            if folder == workdir:
                what = f"--workdir {workdir!r} is not writable ({e.strerror}): a run writes its checkpoints, "
                what += "metrics and lock there"
            else:
                what = f"{folder} is not writable, though --workdir {workdir!r} is ({e.strerror}): the run "
                what += "adds its files there"
            raise NotWritable(f"{what}; {_fix(e)}", e) from None
    for name in appended:
        path = os.path.join(workdir, name)
        if not os.path.isfile(path):
            continue
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        except OSError as e:
            what = f"{path} cannot be written ({e.strerror}): the run appends to it; {_fix(e)}"
            raise NotWritable(what, e) from None
    return created


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} bytes"
    unit = "KiB"
    for unit in ("KiB", "MiB", "GiB"):  # noqa: B007 (the unit the loop stops at is the one shown)
        n /= 1024
        if n < 1024:
            break
    return f"{n:.1f} {unit}"


def _free(directory: str) -> str:
    try:
        return f"{_size(shutil.disk_usage(directory).free)} free"
    except OSError:
        return "free space unknown"


class DiskFull(OSError):
    """A checkpoint that could not be written for lack of disk space (errno ENOSPC); the earlier ones are
    left as they were (orbax renames a step into place only once it is complete)."""

    def __init__(self, directory: str, detail: str, *, started: bool = True):
        where = f"the disk of {os.path.dirname(directory)} ({_free(directory)}; {detail})"
        if started:
            text = (
                f"checkpoint not written: no space left on {where}; the checkpoints already in {directory} "
                "are left as they were: free some space (or use another --workdir) and rerun to resume"
            )
        else:
            text = f"not started: too little space on {where}: free some space, or use another --workdir"
        super().__init__(text)
        self.errno = errno.ENOSPC

    def __str__(self) -> str:
        return self.args[0]


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and x not in seen and len(seen) < 8:
        seen.append(x)
        x = x.__cause__ or x.__context__
    return seen


# TensorStore's text of an OS error: '... Failed writing: "<file>": ... [os_error_code='28']'
_OS_CODE = re.compile(r"os_error_code='?(\d+)")
_FAILED_FILE = re.compile(r'Failed (?:writing|to \w+)[^"]*"([^"]+)"')


def write_errno(e: BaseException) -> tuple[int, str] | None:
    """(errno, the file it names or '') of a full disk (ENOSPC) or an unwritable path (EROFS, EACCES,
    EPERM) in ``e``'s chain (the checkpoint library wraps it, e.g. from its writer threads), or None."""
    wanted = (errno.ENOSPC, errno.EROFS, *_DENIED)
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in wanted:
            return x.errno, x.filename or ""
        text = str(x)
        code = _OS_CODE.search(text)
        number = int(code.group(1)) if code else None
        if number is None and "No space left on device" in text:
            number = errno.ENOSPC
        if number in wanted:
            file = _FAILED_FILE.search(text)
            return number, file.group(1) if file else ""
    return None


@contextlib.contextmanager
def writing(directory: str):
    """Raise a full disk or an unwritable checkpoints folder met while writing a checkpoint as one line."""
    try:
        yield
    except (DiskFull, NotWritable):
        raise
    except Exception as e:
        found = write_errno(e)
        if found is None:
            raise
        number, file = found
        where = f" writing {file}" if file and file != directory else ""
        if number == errno.ENOSPC:
            raise DiskFull(directory, f"{os.strerror(number)}{where}") from None
        cause = OSError(number, os.strerror(number), file or directory)
        raise NotWritable(
            f"checkpoint not written: {directory} is not writable ({os.strerror(number)}{where}); the "
            f"checkpoints already there are left as they were: {_fix(cause)}, and rerun to resume",
            cause,
        ) from None


def probe_folder(directory: str) -> None:
    """Make and remove a folder in ``directory``, as a save's first step does, raising its ``OSError``: when
    the checkpoint library fails to make a step's folder, its writer threads wait minutes for it (also at
    exit), so a folder that turned read-only or a full disk is found here first."""
    path = os.path.join(directory, f".write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        os.rmdir(path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, directory) from None


def state_bytes(state: Any) -> int:
    """Bytes of the arrays a checkpoint of ``state`` holds (params, EMA, optimizer state; global arrays)."""
    arrays = [x for x in jax.tree.leaves(state) if hasattr(x, "dtype") and hasattr(x, "size")]
    return sum(int(x.size) * x.dtype.itemsize for x in arrays)


def check_space(directory: str, state: Any, keep: int) -> None:
    """Before training: refuse (``DiskFull``) a run whose checkpoints folder's disk cannot hold one
    checkpoint of ``state``, and warn when it cannot hold ``keep`` + 1 (a new step is written before the
    oldest is rotated out)."""
    need = state_bytes(state)
    probe = directory if os.path.isdir(directory) else os.path.dirname(directory)
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    if free < need:
        raise DiskFull(directory, f"one checkpoint of this run takes about {_size(need)}", started=False)
    if free < need * (keep + 1):
        logging.warning(
            "%s: the disk has %s free, less than the %d checkpoints of about %s each this run may hold at "
            "once (train.keep_checkpoints + 1): a later save may find the disk full",
            directory,
            _size(free),
            keep + 1,
            _size(need),
        )


def reported_by_us(record: py_logging.LogRecord) -> bool:
    """Whether ``record`` is the checkpoint library's log of a write that failed for a full disk or an
    unwritable folder: ``writing`` raises that failure as one line, which these tracebacks would bury."""
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
        return False
    if record.exc_info and record.exc_info[1] is not None and write_errno(record.exc_info[1]):
        return True
    try:
        text = record.getMessage()
    except Exception:
        return False
    return write_errno(RuntimeError(text)) is not None


class _Reported(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
        return not reported_by_us(record)


_REPORTED = _Reported()


def leave_out_library_logs() -> None:
    """Drop the records ``reported_by_us`` on the logger the checkpoint library logs to, before any handler
    (the console, a log file, a test's capture) sees them. Idempotent."""
    logger = py_logging.getLogger("absl")
    if _REPORTED not in logger.filters:
        logger.addFilter(_REPORTED)
