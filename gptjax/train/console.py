"""The scripts' terminal: quiet by default, one line for a mistake the user can fix.

    from gptjax.train import console
    def main(argv):
        console.setup_logging()      # gptjax's INFO lines; libraries' warnings and errors only
        ...
    if __name__ == "__main__":
        console.main(main)           # app.run(main), with the manners below

By default a script prints gptjax's own progress and whatever any library reports at WARNING or above:
no TensorFlow / CUDA lines from TensorFlow's C++ libraries while they load (``failed call to cuInit`` on a
machine without a GPU, oneDNN and ``cudart_stub`` notices), no orbax or JAX INFO lines. A config or input
error (a ``ValueError``, a missing file, a run's own verdict such as a locked workdir) ends in one line
naming the fix, with where it was raised; ``--config.train.stpes=3`` ends in one line naming the key and
its close matches. ``--verbose`` shows everything: library INFO logs, TensorFlow's native lines and the
traceback. Nothing here imports JAX or TensorFlow.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.abc
import logging as py_logging
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from absl import app, flags, logging

# Lines TensorFlow's C++ libraries write to stderr while they load, before any log level of theirs applies
# (absl's preamble, its INFO / WARNING lines, CUDA's complaints on a machine without a GPU).
NATIVE_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:.]+ +\d+ \w+\.(cc|h):\d+\] "
    r"|E\d{4} [\d:.]+ +\d+ \w+\.(cc|h):\d+\] .*(cuInit|CUDA|cuda)"
    r"|To enable the following instructions: "
)
# Imported with stderr filtered (the first time): their native libraries log while they load.
NOISY_IMPORTS = ("tensorflow",)
# Exceptions whose message is meant for the user (what to fix), shown as one line without a traceback;
# any exception class gptjax defines is one too (a locked workdir, a full disk, a non-finite step).
USER_ERRORS = (
    ValueError,
    FloatingPointError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
EXCEPTION_LINE = re.compile(r"[\w.]+(Error|Exception): ")
VERBOSE_HELP = "Show library INFO logs, TensorFlow's native lines and full tracebacks."

_package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # gptjax/
_repo = os.path.dirname(_package)
OURS = tuple(
    os.path.join(p, "") for p in (_package, os.path.join(_repo, "scripts"), os.path.join(_repo, "kernels"))
)


def verbose() -> bool:
    """Whether ``--verbose`` was given (read from the command line when flags are not parsed yet)."""
    if "verbose" in flags.FLAGS and flags.FLAGS.is_parsed():
        return bool(flags.FLAGS.verbose)
    return any(a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in sys.argv[1:])


def quiet_native() -> None:
    """Before TensorFlow loads: C++ INFO and WARNING logs off (TensorFlow's and XLA's; errors stay), and
    TensorFlow's import and first look for GPUs with stderr filtered."""
    if verbose():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in NOISY_IMPORTS:
        if name not in sys.modules and not any(
            isinstance(f, _FilteredImport) and f.name == name for f in sys.meta_path
        ):
            sys.meta_path.insert(0, _FilteredImport(name))


def _keep(record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or record.pathname.startswith(OURS)


def setup_logging(level: int = logging.INFO) -> None:
    """gptjax's own log lines from ``level`` up (INFO: progress; chat and generate use WARNING) and only
    warnings and errors from libraries (orbax, JAX, seqio, TensorFlow); ``--verbose``: everything at INFO.
    An explicit ``--verbosity`` wins."""
    quiet_native()
    handler = logging.get_absl_handler()
    for f in list(handler.filters):
        if f is _keep:
            handler.removeFilter(f)
    if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
        return
    if verbose():
        logging.set_verbosity(logging.INFO)
        return
    logging.set_verbosity(level)
    handler.addFilter(_keep)


@contextlib.contextmanager
def native_stderr_filtered(noise: re.Pattern = NATIVE_NOISE) -> Iterator[None]:
    """Within the block, what anything in the process writes to file descriptor 2 goes to a file; at its end
    the lines ``noise`` does not match are written to stderr (C++ libraries write there directly, past
    Python's sys.stderr and logging)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                held.seek(0)
                text = held.read().decode(errors="replace")
                kept = [line for line in text.splitlines(keepends=True) if not noise.match(line)]
                if kept:
                    sys.stderr.write("".join(kept))
                    sys.stderr.flush()
    finally:
        os.close(saved)


class _FilteredImport(importlib.abc.MetaPathFinder):
    """Finds module ``name`` with a loader that runs it inside ``native_stderr_filtered``; gone once it has
    loaded. (Asked without an import too: ``importlib.util.find_spec`` is how libraries check for it.)"""

    def __init__(self, name: str):
        self.name = name

    def find_spec(self, fullname: str, path: Any, target: Any = None):
        if fullname != self.name:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find and finder is not self else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _FilteredLoader(spec.loader, self)
                return spec
        return None


class _FilteredLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, finder: _FilteredImport):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self.finder)  # loaded once: its submodules and later imports as usual
        with native_stderr_filtered():
            self.loader.exec_module(module)
            if hasattr(module, "config"):  # TensorFlow looks for GPUs once, logging CUDA's errors if none
                module.config.list_physical_devices()

    def __getattr__(self, name: str):  # resource readers and the like: the real loader's
        return getattr(self.loader, name)


def config_key_error(argv: list[str], flag: str = "config") -> str | None:
    """For ``--config.a.b=v`` overrides naming no key of the ``--config`` file's config: one line naming the
    first such key and its close matches (None when every key exists or the config cannot be read)."""
    spec, overrides = None, []
    for i, arg in enumerate(argv):
        name, eq, value = arg.lstrip("-").partition("=")
        if not arg.startswith("-"):
            continue
        if name == flag:
            spec = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        elif name.startswith(flag + "."):
            overrides.append(name[len(flag) + 1 :])
    if spec is None or not overrides:
        return None
    try:
        from gptjax.train import defaults  # only on this error's path: it imports the model and the data

        config = defaults.load_config(spec)
    except Exception:  # noqa: BLE001  (the config's own error is not this one)
        return None
    for path in overrides:
        node, parts = config, path.split(".")
        for depth, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                known = ".".join(parts[: depth + 1])
                return _unknown_key(f"--{flag}.{path}", known, _paths(config), spec)
            node = node[part]
    return None


def _paths(node: Any, prefix: str = "") -> list[str]:
    out = []
    for key in node.keys() if hasattr(node, "keys") else ():
        path = f"{prefix}{key}"
        out.append(path)
        out += _paths(node[key], path + ".")
    return out


def _unknown_key(arg: str, key: str, paths: list[str], spec: str) -> str:
    """The line for ``key`` missing from a config of ``paths``: its close matches in its own section, else
    keys of that name elsewhere (``train.lr`` -> ``optim.lr``), else the section's keys."""
    section, _, name = key.rpartition(".")
    siblings = [p for p in paths if p.rpartition(".")[0] == section]
    names = {p.rpartition(".")[2]: p for p in siblings}
    close = [names[n] for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6)]
    if not close:  # the right key in another section
        close = [p for p in paths if p.rpartition(".")[2] == name]
    if close:
        hint = "did you mean " + " or ".join(close[:3]) + "?"
    elif siblings:
        hint = f"the keys of {section or 'the config'}: {', '.join(sorted(names))}"
    else:
        hint = f"{section} is a value, not a section"
    return f"{arg}: {spec} has no key {key}; {hint}"


def _where(e: BaseException) -> str:
    """'file:line in function' of the innermost frame in gptjax or scripts/ (else the innermost)."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if f.filename.startswith(OURS)] or frames
    if not ours:
        return ""
    f = ours[-1]
    return f"{os.path.relpath(f.filename, _repo)}:{f.lineno} in {f.name}"


def user_message(e: BaseException) -> str | None:
    """The report of ``e`` when it is a config or input error (one line, two with where it was raised),
    else None."""
    if not (isinstance(e, USER_ERRORS) or type(e).__module__.startswith("gptjax.")):
        return None
    where = _where(e)
    hint = f"raised at {where}; --verbose shows the traceback" if where else "--verbose shows the traceback"
    return f"{str(e) or type(e).__name__}\n  ({hint})"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (``app.run``'s ``flags_parser``), with its errors in one line: a bad flag value,
    an unknown flag, the config file's own error (its message, not absl's copy of its traceback), an override
    naming no config key (``config_key_error``)."""
    if verbose():
        return app.parse_flags_with_usage(argv)
    try:
        args = flags.FLAGS(argv)
        message = _config_load_error()
        if message is None:
            return args
    except flags.Error as e:
        message = _flag_error(str(e))
    except (KeyError, AttributeError):
        message = config_key_error(argv[1:])
        if message is None:
            raise
    fail(f"{message}\n  (--helpshort lists the flags; --verbose shows the traceback)")


def _config_load_error() -> str | None:
    """A config file flag whose file could not be loaded (ml_collections keeps the error for the first
    use of the config): one line naming it."""
    for name in flags.FLAGS:
        value = flags.FLAGS[name].value
        if type(value).__name__ == "_ErrorConfig":  # ml_collections' stand-in for a config that failed
            error = object.__getattribute__(value, "_error")
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            return f"--{name}: the config file cannot be loaded: {lines[-1] if lines else error}"
    return None


def _flag_error(text: str) -> str:
    """absl's message for a flag that failed to parse; for a config file that raised, the file's exception
    (absl quotes its whole traceback, whose last line is the exception)."""
    if "Traceback (most recent call last)" not in text:
        return text
    flag = text.split(":", 1)[0]
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    exception = EXCEPTION_LINE.match(last)  # 'ValueError: ...': the message alone
    return f"{flag}: {last[exception.end() :] if exception else last}"


def fail(message: str) -> None:
    """End the script: ``<script>: error: <message>`` on stderr, exit status 1."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(1)


def main(fn: Callable[[list[str]], Any]) -> None:
    """``absl.app.run(fn)`` with the terminal quiet (``quiet_native`` before anything loads TensorFlow) and a
    config or input error reported in a line or two, exit status 1; ``--verbose`` (defined here) shows the
    traceback instead."""
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, VERBOSE_HELP)
    quiet_native()
    try:
        app.run(fn, flags_parser=parse_flags)
    except Exception as e:  # noqa: BLE001  (SystemExit and KeyboardInterrupt pass: not Exceptions)
        message = None if verbose() else user_message(e)
        if message is None:
            raise
        fail(message)
