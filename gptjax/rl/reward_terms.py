"""An RL rollout's reward as a weighted sum of terms: a frozen reward model and Python functions.

    score_B = rm_weight * rm_score_B + sum_i weight_i * fn_i(prompts, responses, **fields)_B  (+ overlong)

Terms (``config.rollout``):

- ``rm_weight`` (1.0): the frozen reward model (role 'reward'), scored inside the experience pass as before
  (``reward_at``, ...). 0: no reward model at all; none is loaded and no ``frozen.reward`` is needed.
- ``reward_fn`` ('module:function', several separated by commas) with ``reward_fn_weight`` (1.0): a function
  term each, named after the function.
- ``reward_terms``: named terms ``{name: {"fn": "module:function", "weight": w, <option>: value, ...}}``;
  the options are passed to the function as keyword arguments.
- ``overlong_buffer`` (tokens; 0: off) with ``overlong_weight`` (1.0): DAPO's soft overlong punishment. With
  L = max_new_tokens and b the buffer, a response of length n scores 0 up to L - b, then falls linearly to -1
  at L; a response cut off at L without EOS scores -1.

A function term is ``fn(prompts: list[str], responses: list[str], **fields) -> Sequence[float]``: one value
per response; ``fields`` are the prompt records' other fields as lists aligned with the rows (e.g. the
``answer`` of a JSONL record: ``answer=[...]``), so a task brings its ground truth. It runs on the host after
generation, in a worker thread with a deadline (``reward_fn_timeout_s``): a function that raises, returns
the wrong number of values, a value that is not a finite number, or runs past its deadline stops the run
with an error naming the function and showing the first prompt and response concerned (no fallback: a reward
that silently becomes 0 trains the policy on a wrong signal). Each term's mean is logged per rollout as
``reward/<name>`` (the reward model's as ``reward/rm``), and each function's wall time as
``time/reward/<name>``.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

# Options a reward_terms entry has besides those passed to its function.
TERM_KEYS = ("fn", "weight")


@dataclasses.dataclass(frozen=True)
class Term:
    """One function term: its name (the metric's), the spec it was loaded from, its weight and options."""

    name: str
    spec: str
    weight: float
    fn: Callable
    options: dict = dataclasses.field(default_factory=dict)


def load_function(spec: str, key: str) -> Callable:
    """'module:function' -> the function; a clear error naming the config key otherwise."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"{key}={spec!r}: give a function as 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{key}={spec!r}: cannot import it ({e}); use 'module:function'") from None
    if not callable(fn):
        raise ValueError(f"{key}={spec!r} is not a function")
    return fn


def rm_weight(config) -> float:
    return float(config.rollout.get("rm_weight", 1.0))


def function_terms(config) -> list[Term]:
    """The rollout's function terms (module doc), loaded; a clear error for a bad entry."""
    r = config.rollout
    terms: list[Term] = []
    for spec in [s.strip() for s in (r.get("reward_fn") or "").split(",") if s.strip()]:
        fn = load_function(spec, "rollout.reward_fn")
        terms.append(Term(spec.partition(":")[2], spec, float(r.get("reward_fn_weight", 1.0)), fn))
    for name, entry in (r.get("reward_terms") or {}).items():
        key = f"rollout.reward_terms.{name}"
        entry = dict(entry)
        if "fn" not in entry:
            raise ValueError(f"{key}: needs 'fn': 'module:function' (and optionally 'weight')")
        fn = load_function(entry["fn"], f"{key}.fn")
        options = {k: v for k, v in entry.items() if k not in TERM_KEYS}
        terms.append(Term(name, entry["fn"], float(entry.get("weight", 1.0)), fn, options))
    names = [t.name for t in terms]
    if len(set(names)) < len(names) or "rm" in names or "overlong" in names:
        raise ValueError(
            f"rollout reward terms {names}: each needs its own name, and 'rm' / 'overlong' are taken (name "
            "them under rollout.reward_terms)"
        )
    return terms


def check_config(config) -> list[str]:
    """Problems with the reward terms (one line each); [] when they are fine. Loads the functions."""
    r, problems = config.rollout, []
    w = rm_weight(config)
    if not math.isfinite(w) or w < 0:
        problems.append(f"rollout.rm_weight={w}: must be >= 0 (0: no reward model)")
    try:
        terms = function_terms(config)
    except ValueError as e:
        return problems + [str(e)]
    for t in terms:
        if not math.isfinite(t.weight):
            problems.append(f"reward term {t.name!r}: weight {t.weight} is not finite")
    buffer = int(r.get("overlong_buffer", 0))
    if buffer < 0 or buffer >= r.max_new_tokens and buffer:
        problems.append(
            f"rollout.overlong_buffer={buffer}: must be in [0, max_new_tokens={r.max_new_tokens}) (0: off)"
        )
    if r.get("reward_fn_timeout_s", 1) <= 0:
        problems.append(f"rollout.reward_fn_timeout_s={r.reward_fn_timeout_s}: must be > 0")
    if w == 0 and not terms and not buffer:
        problems.append(
            "rollout.rm_weight=0 and no reward function: the rollout has no reward; set "
            "rollout.reward_fn=module:function (or rollout.reward_terms) or rm_weight > 0"
        )
    return problems


def overlong_penalty(
    lengths_B: np.ndarray, ended_B: np.ndarray, max_new_tokens: int, buffer: int
) -> np.ndarray:
    """DAPO's soft overlong punishment (module doc), per response: 0, a linear ramp to -1 over the last
    ``buffer`` tokens, -1 when cut off at the limit without EOS."""
    n_B = np.asarray(lengths_B, np.float64)
    start = max_new_tokens - buffer
    out = np.where(n_B <= start, 0.0, (start - n_B) / max(buffer, 1))
    return np.where(np.asarray(ended_B, bool), out, -1.0)


def _call(fn: Callable, args: tuple, kwargs: dict, timeout_s: float, what: str):
    """fn(*args, **kwargs) in a daemon thread, waited for at most timeout_s (a thread cannot be stopped:
    the run ends with the error, and the daemon thread with the process)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 (handed to the caller)
            box["error"] = e

    worker = threading.Thread(target=target, name=f"reward {what}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise TimeoutError(
            f"reward function {what} ran past rollout.reward_fn_timeout_s={timeout_s:g} s on one rollout; "
            "make it faster or raise the limit"
        )
    if "error" in box:
        raise box["error"]
    return box["value"]


def _row(prompts, responses, fields, i) -> str:
    extra = "".join(f", {k}={v[i]!r}" for k, v in fields.items())
    return f"row {i}: prompt {prompts[i]!r}, response {responses[i]!r}{extra}"


def score_term(
    term: Term, prompts: list[str], responses: list[str], fields: dict[str, list], timeout_s: float
) -> np.ndarray:
    """[B] float64: one function term's values, checked (module doc)."""
    what = f"{term.name!r} ({term.spec})"
    try:
        values = _call(term.fn, (prompts, responses), {**fields, **term.options}, timeout_s, what)
    except TimeoutError:
        raise
    except Exception as e:
        # find the first response it fails on, to show it (a few rows, each under the same deadline)
        for i in range(min(len(prompts), 16)):
            one = {k: v[i : i + 1] for k, v in fields.items()}
            try:
                _call(
                    term.fn,
                    (prompts[i : i + 1], responses[i : i + 1]),
                    {**one, **term.options},
                    timeout_s,
                    what,
                )
            except Exception as row_error:
                raise RuntimeError(
                    f"reward function {what} raised {row_error!r} on {_row(prompts, responses, fields, i)}"
                ) from row_error
        raise RuntimeError(
            f"reward function {what} raised {e!r} on a rollout of {len(prompts)} responses"
        ) from e
    try:
        out = np.asarray([float(v) for v in values], np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward function {what} must return one number per response: {e}") from None
    if out.shape != (len(prompts),):
        raise ValueError(
            f"reward function {what} returned {out.size} values for {len(prompts)} responses (one each)"
        )
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"reward function {what} returned {out[i]} for {_row(prompts, responses, fields, i)} "
            f"({bad.size} non-finite values in all)"
        )
    return out


def score_functions(
    terms: Sequence[Term], prompts: list[str], responses: list[str], fields: dict[str, list], timeout_s: float
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """({term name: [B] values}, {term name: seconds}) of every function term."""
    values, seconds = {}, {}
    for term in terms:
        start = time.perf_counter()
        values[term.name] = score_term(term, prompts, responses, fields, timeout_s)
        seconds[term.name] = time.perf_counter() - start
    return values, seconds


def weighted_sum(terms: Sequence[Term], values: dict[str, np.ndarray], n: int) -> np.ndarray:
    """[n] float32: sum_i weight_i * values[name_i] (the function terms' part of the score)."""
    total = np.zeros((n,), np.float64)
    for term in terms:
        total += term.weight * values[term.name]
    return total.astype(np.float32)
