"""Orbax checkpoints: save every N steps and at the end, keep the last K, resume from the workdir, and
initialise a new stage from an earlier stage's params (``init_from``).

A checkpoint step holds separate items so that a later stage can read the params alone:
``params`` (the trained params; with several trained roles a dict keyed by role), ``ema`` (the EMA of the
params, when kept), ``opt`` (optimizer state and step) as arrays, ``data`` (the batch source's position) and
``meta`` (stage, each role's model config, the run config) as JSON. Any role of a workdir, or its EMA, loads
on its own: ``load_model(workdir, role="value", ema=True)``.

Orbax writes a step into a temporary directory and renames it when complete, so a kill during a save leaves
the earlier steps as they were. A resume takes the newest step that restores (``restore_latest``); a step
the checkpoint library fails to read, whatever its error, is reported as damaged (``DamagedCheckpoint``,
naming the file or the step), never as another model's checkpoint; another model's shapes stay an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from gptjax import model
from gptjax.checkpoint.disk import (  # noqa: F401 (store.DiskFull)
    DiskFull,
    NotWritable,
    leave_out_library_logs,
    probe_folder,
    writing,
)
from gptjax.checkpoint.integrity import (  # noqa: F401 (store.DamagedCheckpoint, store._name)
    CHECKSUMS,
    DamagedCheckpoint,
    _name,
    checksums,
    first_nonfinite,
    verify_checksums,
)

Params = dict[str, Any]


def _ckpt_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class _Manager(ocp.CheckpointManager):
    # orbax commits a save in a background thread: a full disk (or a folder that turned read-only) surfaces
    # in wait_until_finished (also called by close) or in the next save, so both say it in one line.
    def wait_until_finished(self):
        with writing(str(self.directory)):
            super().wait_until_finished()


def manager(workdir: str, *, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    directory = _ckpt_dir(workdir)
    if os.path.exists(directory) and not os.path.isdir(directory):
        # orbax would train, fail at the first save and then wait minutes on its other processes
        raise ValueError(
            f"{directory} is a file, not a checkpoints directory: move it aside or use another --workdir"
        )
    leave_out_library_logs()  # its tracebacks of a full disk: ``writing`` raises that as one line
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    handlers = {
        # PyTree handler (same format as Standard) so that init_from can restore a subset of the params
        "params": ocp.PyTreeCheckpointHandler(),
        "ema": ocp.PyTreeCheckpointHandler(),
        "opt": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return _Manager(directory, options=options, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, state: Any, *, data_state: dict | None, meta: dict) -> None:
    """Write one step (async; call ``mngr.wait_until_finished()`` before exiting). A state holding a NaN or
    an infinity anywhere (params, EMA, optimizer state) is refused (``FloatingPointError``): a checkpoint
    is what a resume, a later stage and rotation trust, so it must never hold one."""
    step = int(jax.device_get(state.step))
    for item, tree in (("params", state.params), ("ema", state.ema_params), ("opt_state", state.opt_state)):
        leaf = first_nonfinite(tree) if tree is not None else None
        if leaf is not None:
            raise FloatingPointError(
                f"checkpoint step {step} not written: {item} holds a non-finite value (NaN or inf), first "
                f"at {item}{leaf}; the checkpoints already in {mngr.directory} are left as they were"
            )
    meta = {**meta, CHECKSUMS: checksums(state)}  # verified by ``restore``
    items = dict(
        params=ocp.args.PyTreeSave(state.params),
        opt=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
        data=ocp.args.JsonSave(data_state or {}),
        meta=ocp.args.JsonSave(meta),
    )
    if state.ema_params is not None:
        items["ema"] = ocp.args.PyTreeSave(state.ema_params)
    with writing(str(mngr.directory)):  # a full disk: one line naming the workdir and its free space
        probe_folder(str(mngr.directory))  # before the library's threads start waiting on a folder
        mngr.save(step, args=ocp.args.Composite(**items))


def _abstract(tree: Any) -> Any:
    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def _params_restore(target: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restore args that place every array with ``target``'s shape, dtype and sharding."""
    abstract = _abstract(target)
    return ocp.args.PyTreeRestore(
        item=abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=partial,
    )


def step_path(mngr: ocp.CheckpointManager, step: int) -> str:
    """The directory of one checkpoint step."""
    return os.path.join(str(mngr.directory), str(step))


def check_intact(mngr: ocp.CheckpointManager, step: int, items: tuple[str, ...]) -> None:
    """Raise ``DamagedCheckpoint`` naming the first metadata file of ``items`` that is missing (without it
    a restore would misreport the step as holding no arrays, or another model)."""
    for item in items:
        name = "metadata" if item in ("data", "meta") else "_METADATA"  # JSON items / array trees
        path = os.path.join(step_path(mngr, step), item, name)
        if not os.path.isfile(path):
            raise DamagedCheckpoint(step, path, "missing")


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:500]


def _damaged(e: Exception, step: int, step_dir: str) -> DamagedCheckpoint | None:
    """An error raised while the checkpoint library read a step, as that step's damage, naming the file
    when some error in the chain names one (orbax wraps TensorStore's errors in a plain Exception whose own
    text names only an array index). None for a lack of memory, which says nothing about the files."""
    if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e):
        return None
    chain: list[BaseException] = []
    x: BaseException | None = e
    while x is not None and x not in chain and len(chain) < 8:
        chain.append(x)
        x = x.__cause__ or x.__context__
    for x in chain:
        text = str(x).split(" [tensorstore_spec")[0]
        files = re.findall(r'local file "([^"]+)"', text)  # TensorStore names the directory, then the file
        if files:
            return DamagedCheckpoint(step, files[-1], _first_line(text))
    for x in chain:
        if isinstance(x, (OSError, json.JSONDecodeError)):
            where = getattr(x, "filename", None) or step_dir
            return DamagedCheckpoint(step, where, f"{type(x).__name__}: {_first_line(str(x))}")
    return DamagedCheckpoint(step, step_dir, f"{type(e).__name__}: {_first_line(str(e))}")


@contextlib.contextmanager
def _reading(step: int, step_dir: str):
    """Raise any error of the checkpoint library while reading ``step`` as ``DamagedCheckpoint``."""
    try:
        yield
    except Exception as e:
        damaged = _damaged(e, step, step_dir)
        if damaged is None:
            raise
        raise damaged from e


def restore(mngr: ocp.CheckpointManager, state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restore (state, data_state) into the layout of ``state`` (an initialised or abstract state).

    Raises ``DamagedCheckpoint`` for a step whose files are missing or unreadable, ``ValueError`` for an
    intact one of another model."""
    step = mngr.latest_step() if step is None else step
    names = ("params", "opt", "data", "meta") + (("ema",) if state.ema_params is not None else ())
    if "ema" in names and not os.path.isdir(os.path.join(step_path(mngr, step), "ema")):
        raise ValueError(
            f"checkpoint {step_path(mngr, step)} holds no EMA weights, and this run keeps an EMA: use the "
            "optim.ema_decay it was written with (0), or start fresh"
        )
    check_intact(mngr, step, names)
    items = dict(
        params=_params_restore(state.params),
        opt=ocp.args.StandardRestore(_abstract({"step": state.step, "opt_state": state.opt_state})),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),  # its checksums are compared with the arrays read
    )
    if state.ema_params is not None:
        items["ema"] = _params_restore(state.ema_params)
    # Whatever the checkpoint library raises while it reads the step is that step's damage; what this
    # module concludes from what it read (another model's shapes) is a hard error, never damage.
    with _reading(step, step_path(mngr, step)):
        saved = _saved_param_shapes(mngr, step)  # the arrays' metadata
    check_params(mngr, step, state.params, where=f"{mngr.directory}/{step}", saved=saved)
    with _reading(step, step_path(mngr, step)):
        out = mngr.restore(step, args=ocp.args.Composite(**items))
    trees = {"params": out.params, "opt": out.opt} | (
        {"ema": out.ema} if state.ema_params is not None else {}
    )
    verify_checksums(step, step_path(mngr, step), dict(out.meta or {}).get(CHECKSUMS), trees)
    restored = state.replace(  # a gptjax.train.state.TrainState
        step=out.opt["step"],
        params=out.params,
        opt_state=out.opt["opt_state"],
        ema_params=out.ema if state.ema_params is not None else None,
    )
    return restored, dict(out.data or {})


def restore_latest(mngr: ocp.CheckpointManager, state: Any) -> tuple[Any, dict, int] | None:
    """(state, data_state, step) of the newest intact checkpoint, None when there is none.

    Each damaged newer step is reported and moved to ``<workdir>/checkpoints-damaged/<step>`` (nothing is
    deleted), so that the resumed run can write that step again; when every step is damaged nothing is moved
    and the error lists them all.
    """
    damaged: list[DamagedCheckpoint] = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            restored, data_state = restore(mngr, state, step)
        except DamagedCheckpoint as e:
            logging.warning("%s; trying the checkpoint before it", e)
            damaged.append(e)
            continue
        if damaged:
            moved = [_move_aside(mngr, d.step) for d in damaged]
            logging.warning(
                "resuming from step %d, the newest intact checkpoint; the damaged one(s) are kept in %s",
                step,
                ", ".join(moved),
            )
        return restored, data_state, step
    if damaged:
        raise DamagedCheckpoint(
            damaged[0].step,
            str(mngr.directory),
            "no intact checkpoint to resume from:\n  "
            + "\n  ".join(str(d) for d in damaged)
            + "\nMove the checkpoints directory aside to start this run afresh",
        )
    return None


def _move_aside(mngr: ocp.CheckpointManager, step: int) -> str:
    """Move a damaged step out of the checkpoints directory (process 0; all processes then see it gone)."""
    root = os.path.join(os.path.dirname(str(mngr.directory)), "checkpoints-damaged")
    dest = os.path.join(root, str(step))
    if jax.process_index() == 0:
        os.makedirs(root, exist_ok=True)
        n = 0
        while os.path.exists(dest):
            n += 1
            dest = os.path.join(root, f"{step}-{n}")
        os.rename(step_path(mngr, step), dest)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    mngr.reload()
    return dest


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_name(path): tuple(x.shape) for path, x in flat}


def _saved_param_shapes(
    mngr: ocp.CheckpointManager, step: int, item: str = "params", prefix: str = ""
) -> dict[str, tuple]:
    """Saved ``item``'s shapes by param name; with ``prefix`` ('policy/') only that subtree, unprefixed."""
    meta = mngr.item_metadata(step)
    item_meta = meta[item] if isinstance(meta, dict) or hasattr(meta, "__getitem__") else getattr(meta, item)
    if item_meta is None:
        raise FileNotFoundError(f"{mngr.directory}/{step} has no {item!r} item")
    tree = getattr(item_meta, "tree", item_meta)
    shapes = _flat_shapes(tree)
    return {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}


def check_params(
    mngr: ocp.CheckpointManager,
    step: int,
    target: Params,
    *,
    where: str,
    allow_missing: tuple[str, ...] = (),
    allow_extra: tuple[str, ...] = (),
    item: str = "params",
    prefix: str = "",
    saved: dict[str, tuple] | None = None,
) -> None:
    """Raise naming every parameter whose shape differs, is missing from, or is extra in the checkpoint
    (``saved``: its shapes, when already read)."""
    if saved is None:
        saved = _saved_param_shapes(mngr, step, item, prefix)
    problems = shape_problems(saved, _flat_shapes(target), allow_missing, allow_extra)
    if problems:
        raise ValueError(
            f"checkpoint {where} does not match the model config:\n"
            + "\n".join(problems)
            + "\nUse the model config the checkpoint was trained with (see its meta.json), or start fresh."
        )


def shape_problems(
    saved: dict[str, tuple],
    want: dict[str, tuple],
    allow_missing: tuple[str, ...] = (),
    allow_extra: tuple[str, ...] = (),
) -> list[str]:
    """One line per param missing from, extra in, or shaped differently in ``saved`` than in ``want``."""
    problems = []
    for name, shape in want.items():
        if name not in saved:
            if not allow_missing or not name.startswith(allow_missing):
                problems.append(f"  {name}: expected {shape}, not in the checkpoint")
        elif saved[name] != shape:
            problems.append(f"  {name}: checkpoint has {saved[name]}, model expects {shape}")
    for name in saved.keys() - want.keys():
        if not allow_extra or not name.startswith(allow_extra):
            problems.append(f"  {name}: in the checkpoint {saved[name]}, not in the model")
    return sorted(problems)


def load_meta(workdir: str, step: int | None = None) -> tuple[int, dict]:
    mngr = manager(workdir, create=False)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {_ckpt_dir(workdir)}")
    check_intact(mngr, step, ("meta",))
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return step, dict(meta)


def _fields(cfg: model.ModelConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def meta_for(model_cfg: model.ModelConfig, stage: str, *, roles: dict | None = None, **extra) -> dict:
    """A run's meta: ``model`` (the first trained role's config) and, with named trained roles (several, or
    one not called 'model'), ``roles`` ({role: config}) with ``keyed_by_role`` (its params tree is keyed by
    role)."""
    meta = {"model": _fields(model_cfg), "stage": stage, **extra}
    if roles and set(roles) != {"model"}:
        meta["roles"] = {name: _fields(cfg) for name, cfg in roles.items()}
        meta["keyed_by_role"] = True
    return meta
