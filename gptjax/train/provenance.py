"""What a run was started with, recorded in each checkpoint's meta and compared on resume.

A run's identity is one flat dict:
- every config key (``optim.lr``, ``data.sources.main.path``, ...) and its value;
- ``<key>@files`` for each non-empty ``*path`` key (data sources, validation files, the vocabulary): the
  matching files' names and sizes with a SHA-256 of their content; a file over ``FULL_HASH_BYTES`` hashes
  its size, first and last MiB instead. Content, not mtime: a copied or touched file is the same data, and
  an edited one with an unchanged size is still caught; the cap keeps the start of a multi-GB corpus short;
- ``<key>@checkpoint`` for each ``init_from`` (trained and frozen roles; a frozen role without one names the
  trained model's): a workdir as ``path@step checksums XXXX`` of its latest checkpoint, where XXXX hashes the
  per-array checksums that step recorded when it was written (its meta only: no array is read), so an
  upstream retrained in place to the same step is told apart; a Hugging Face directory as ``hf`` + a hash of
  its config.json and its weight files' names and sizes.

On resume, keys that change what is trained must match (``train.resume_changes`` lists the ones allowed to
differ, or ``all``); ``HARMLESS`` keys (a longer ``train.steps``, cadences, the mesh, exact accumulation, the
evaluators) may always differ. A key absent on one side (a config key added or removed since) only warns;
an upstream recorded as ``path@step`` alone (before checksums were recorded) is compared by path and step.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import Any

from absl import logging
from ml_collections import ConfigDict

from gptjax import checkpoint

FULL_HASH_BYTES = 64 << 20
_EDGE = 1 << 20

# keys (and prefixes: 'evals' covers 'evals.*') whose change leaves what a resumed run trains as it was
HARMLESS = (
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.eval_steps",
    "train.micro_batches",
    "train.resume_changes",
    "train.nonfinite",
    "train.max_nonfinite_in_a_row",
    "train.divergence_factor",
    "train.divergence_window",
    "train.wandb_project",
    "rollout.score_rows",
    "rollout.reward_fn_timeout_s",
    "rollout.generate_rows",
    "rollout.mesh",
    "evals",
    "mesh",
)


class ResumeMismatch(ValueError):
    """A resume whose checkpoint was written with a different config, data or upstream checkpoint."""


def flat_config(config: ConfigDict) -> dict[str, Any]:
    """{'optim.lr': 0.0003, ...}: every leaf of the config under its dotted key."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = _plain(value)

    walk("", config.to_dict())
    return out


def _plain(value: Any) -> Any:
    """A JSON value standing for ``value`` that is the same from one process to the next."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}:{value.__qualname__}"
    return re.sub(r" at 0x[0-9a-f]+", "", repr(value))


def file_fingerprint(pattern: str) -> str:
    """'N file(s), B bytes, sha256 XXXX' of the files a path, glob or directory names ('no files' if none)."""
    expanded = os.path.expanduser(pattern)
    if os.path.isdir(expanded):
        files = sorted(
            p for p in glob.glob(os.path.join(expanded, "**"), recursive=True) if os.path.isfile(p)
        )
    else:
        files = sorted(p for p in glob.glob(expanded) if os.path.isfile(p))
    if not files:
        return "no files"
    h, total = hashlib.sha256(), 0
    for path in files:
        size = os.path.getsize(path)
        total += size
        h.update(f"{os.path.basename(path)}\0{size}\0".encode())
        with open(path, "rb") as f:
            if size <= FULL_HASH_BYTES:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(f.read(_EDGE))
                f.seek(size - _EDGE)
                h.update(f.read(_EDGE))
    return f"{len(files)} file(s), {total} bytes, sha256 {h.hexdigest()[:16]}"


CHECKSUMS = " checksums "  # between an upstream's path@step and the hash of its recorded checksums


def upstream(path: str) -> str:
    """``path@step checksums XXXX`` of a workdir's latest checkpoint (``path@step`` when it records no
    checksums), ``hf <hash>`` of a Hugging Face directory."""
    if checkpoint.is_hf_dir(path):
        h = hashlib.sha256()
        for name in sorted(os.listdir(path)):
            full = os.path.join(path, name)
            if name == "config.json":
                with open(full, "rb") as f:
                    h.update(f.read())
            elif name.endswith((".safetensors", ".bin")):
                h.update(f"{name}\0{os.path.getsize(full)}\0".encode())
        return f"hf {h.hexdigest()[:16]}"
    try:
        step = checkpoint.manager(path, create=False).latest_step()
    except (FileNotFoundError, OSError, ValueError):
        step = None
    if step is None:
        return f"{path} (no checkpoint)"
    try:
        recorded = checkpoint.load_meta(path, step)[1].get(checkpoint.store.CHECKSUMS)
    except Exception as e:  # whatever the checkpoint library raises for an unreadable meta
        logging.warning("%s: checkpoint %d's meta is unreadable (%s): recorded by step only", path, step, e)
        recorded = None
    if not recorded:
        return f"{path}@{step}"
    digest = hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()[:16]
    return f"{path}@{step}{CHECKSUMS}{digest}"


def _same(key: str, recorded: Any, current: Any) -> bool:
    """Equal values; an upstream recorded without checksums (an older workdir) matches by path and step."""
    if recorded == current:
        return True
    if key.endswith("@checkpoint") and isinstance(recorded, str) and isinstance(current, str):
        if CHECKSUMS not in recorded or CHECKSUMS not in current:
            return recorded.split(CHECKSUMS)[0] == current.split(CHECKSUMS)[0]
    return False


def identity(config: ConfigDict) -> dict[str, Any]:
    """The run's identity (see the module docstring), JSON-normal so it compares equal to a recorded one."""
    flat = flat_config(config)
    out = dict(flat)
    for key, value in flat.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf.endswith("path") and isinstance(value, str) and value and not key.startswith("evals."):
            out[f"{key}@files"] = file_fingerprint(value)
    trained = [k for k in flat if k == "train.init_from" or re.fullmatch(r"roles\.[^.]+\.init_from", k)]
    default = next((flat[k] for k in trained if flat[k]), "")  # a frozen role's '' means this one
    for key in trained + [k for k in flat if re.fullmatch(r"frozen\.[^.]+\.init_from", k)]:
        path = flat[key] or (default if key.startswith("frozen.") else "")
        if path:
            out[f"{key}@checkpoint"] = upstream(path)
    return json.loads(json.dumps(out))


def _covered(key: str, names) -> bool:
    return any(key == n or key.startswith(n + ".") or key.startswith(n + "@") for n in names)


def differences(recorded: dict, current: dict, allowed: str = "") -> tuple[list[str], list[str]]:
    """(refused lines ``key: checkpoint X, now Y``, keys only one side has) between two identities."""
    names = [n.strip() for n in allowed.split(",") if n.strip()]
    if "all" in names:
        return [], []
    lines, one_sided = [], []
    for key in sorted(set(recorded) | set(current)):
        if _covered(key, HARMLESS) or _covered(key, names):
            continue
        if key not in recorded or key not in current:
            one_sided.append(key)
        elif not _same(key, recorded[key], current[key]):
            lines.append(f"{key}: checkpoint {_show(recorded[key])}, now {_show(current[key])}")
    return lines, one_sided


def _show(value: Any) -> str:
    return value if isinstance(value, str) and value else json.dumps(value)


def check(recorded_meta: dict, current: dict, allowed: str, workdir: str, step: int) -> None:
    """Refuse (ResumeMismatch, one line per key) a resume of ``workdir``'s checkpoint at ``step`` whose
    recorded identity differs from ``current`` in a key neither harmless nor ``allowed``; warn when the
    checkpoint records none."""
    recorded = recorded_meta.get("identity")
    if recorded is None:
        logging.warning(
            "%s: the checkpoint at step %d records no run identity (written by an older version): resuming "
            "without comparing its config, data and upstream checkpoints",
            workdir,
            step,
        )
        return
    lines, one_sided = differences(recorded, current, allowed)
    if one_sided:
        logging.warning(
            "%s: keys only the checkpoint or only this run has (not compared): %s",
            workdir,
            ", ".join(one_sided),
        )
    if lines:
        keys = ",".join(line.split(":", 1)[0].split("@", 1)[0] for line in lines)
        keys = ",".join(dict.fromkeys(keys.split(",")))
        raise ResumeMismatch(
            f"{workdir}: refusing to resume from its checkpoint at step {step}, which was trained with\n  "
            + "\n  ".join(lines)
            + f"\nUse a new workdir for this run, or, if the change is deliberate, pass "
            f"--config.train.resume_changes={keys} (or 'all')"
        )


def check_workdir(config: ConfigDict, workdir: str) -> None:
    """``check`` of ``workdir``'s latest checkpoint against ``config`` (before reusing a finished stage)."""
    step, meta = checkpoint.load_meta(workdir)
    check(meta, identity(config), config.train.get("resume_changes", ""), workdir, step)
