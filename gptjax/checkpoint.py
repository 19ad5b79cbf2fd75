"""Orbax checkpoints: save every N steps and at the end, keep the last K, resume from the workdir, and
initialise a new stage from an earlier stage's params (``init_from``).

A checkpoint step holds separate items so that a later stage can read the params alone:
``params`` and ``opt`` (optimizer state, step, EMA) as arrays, ``data`` (the iterator position) and ``meta``
(model config, stage) as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from gptjax import model
from gptjax.state import TrainState

Params = dict[str, Any]


def _ckpt_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, *, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    handlers = {
        # PyTree handler (same format as Standard) so that init_from can restore a subset of the params
        "params": ocp.PyTreeCheckpointHandler(),
        "opt": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(_ckpt_dir(workdir), options=options, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, state: TrainState, *, data_state: dict | None, meta: dict) -> None:
    """Write one step (async; call ``mngr.wait_until_finished()`` before exiting)."""
    step = int(jax.device_get(state.step))
    opt = {"step": state.step, "opt_state": state.opt_state}
    if state.ema_params is not None:
        opt["ema_params"] = state.ema_params
    mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.PyTreeSave(state.params),
            opt=ocp.args.StandardSave(opt),
            data=ocp.args.JsonSave(data_state or {}),
            meta=ocp.args.JsonSave(meta),
        ),
    )


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


def restore(
    mngr: ocp.CheckpointManager, state: TrainState, step: int | None = None
) -> tuple[TrainState, dict]:
    """Restore (state, data_state) into the layout of ``state`` (an initialised or abstract state)."""
    step = mngr.latest_step() if step is None else step
    check_params(mngr, step, state.params, where=f"{mngr.directory}/{step}")
    opt = {"step": state.step, "opt_state": state.opt_state}
    if state.ema_params is not None:
        opt["ema_params"] = state.ema_params
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            params=_params_restore(state.params),
            opt=ocp.args.StandardRestore(_abstract(opt)),
            data=ocp.args.JsonRestore(),
        ),
    )
    restored = TrainState(
        step=out.opt["step"],
        params=out.params,
        opt_state=out.opt["opt_state"],
        ema_params=out.opt.get("ema_params"),
    )
    return restored, dict(out.data or {})


def _name(path) -> str:
    """'blocks/attn/wq': a param's key path as one string (the names errors and logs use)."""
    return "/".join(str(getattr(p, "key", p)) for p in path)


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_name(path): tuple(x.shape) for path, x in flat}


def _saved_param_shapes(mngr: ocp.CheckpointManager, step: int) -> dict[str, tuple]:
    meta = mngr.item_metadata(step)
    params_meta = meta["params"] if isinstance(meta, dict) or hasattr(meta, "__getitem__") else meta.params
    tree = getattr(params_meta, "tree", params_meta)
    return _flat_shapes(tree)


def check_params(
    mngr: ocp.CheckpointManager,
    step: int,
    target: Params,
    *,
    where: str,
    allow_missing: tuple[str, ...] = (),
    allow_extra: tuple[str, ...] = (),
) -> None:
    """Raise naming every parameter whose shape differs, is missing from, or is extra in the checkpoint."""
    saved = _saved_param_shapes(mngr, step)
    want = _flat_shapes(target)
    problems = []
    for name, shape in want.items():
        if name not in saved:
            if not name.startswith(allow_missing) or not allow_missing:
                problems.append(f"  {name}: expected {shape}, not in the checkpoint")
        elif saved[name] != shape:
            problems.append(f"  {name}: checkpoint has {saved[name]}, model expects {shape}")
    for name in saved.keys() - want.keys():
        if not allow_extra or not name.startswith(allow_extra):
            problems.append(f"  {name}: in the checkpoint {saved[name]}, not in the model")
    if problems:
        raise ValueError(
            f"checkpoint {where} does not match the model config:\n"
            + "\n".join(sorted(problems))
            + "\nUse the model config the checkpoint was trained with (see its meta.json), or start fresh."
        )


def load_meta(workdir: str, step: int | None = None) -> tuple[int, dict]:
    mngr = manager(workdir, create=False)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {_ckpt_dir(workdir)}")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return step, dict(meta)


def model_config_from_meta(meta: dict) -> model.ModelConfig:
    fields = {f.name for f in dataclasses.fields(model.ModelConfig)}
    unknown = sorted(set(meta["model"]) - fields)
    if unknown:
        raise ValueError(
            f"checkpoint model config has field(s) {unknown} that this version of gptjax.model.ModelConfig "
            "does not know: it was written by a different version; use that version to read it"
        )
    return model.ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["model"].items()})


def load_params(
    workdir: str,
    target: Params,
    *,
    step: int | None = None,
    allow_missing: tuple[str, ...] = (),
    allow_extra: tuple[str, ...] = (),
) -> Params:
    """Params of an earlier run restored into ``target``'s shapes and shardings.

    Names in ``allow_missing`` (absent from the checkpoint) keep their value from ``target`` (e.g. a fresh
    scalar head for a reward model initialised from an SFT model); names in ``allow_extra`` (in the
    checkpoint, not in the model, e.g. the SFT model's LM head) are ignored. Any other difference is an error.
    """
    mngr = manager(workdir, create=False)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"init_from: no checkpoint in {_ckpt_dir(workdir)}")
    check_params(
        mngr,
        step,
        target,
        where=f"{_ckpt_dir(workdir)}/{step}",
        allow_missing=allow_missing,
        allow_extra=allow_extra,
    )
    saved = _saved_param_shapes(mngr, step)
    wanted = {name: x for name, x in _flat(target).items() if name in saved}
    restore_tree = _nest({k: _abstract(v) for k, v in wanted.items()})
    out = mngr.restore(
        step, args=ocp.args.Composite(params=_params_restore(restore_tree, partial=True))
    ).params
    restored = _flat(out)
    logging.info(
        "init_from %s step %d: %d params restored, fresh: %s, ignored: %s",
        workdir,
        step,
        len(restored),
        sorted(set(_flat_shapes(target)) - set(restored)) or "none",
        sorted(set(saved) - set(restored)) or "none",
    )
    return jax.tree_util.tree_map_with_path(lambda path, x: restored.get(_name(path), x), target)


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for name, x in flat.items():
        node = out
        keys = name.split("/")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = x
    return out


def _target(cfg: model.ModelConfig, mesh) -> Params:
    shapes = model.param_shapes(cfg)
    if mesh is None:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes)
    from gptjax import sharding

    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes,
        sharding.param_shardings(cfg, mesh),
    )


def lora_base_path(workdir: str, meta: dict) -> str:
    """Where a LoRA run's frozen base came from: its ``train.init_from`` (a workdir or an HF directory)."""
    config = meta.get("config")
    config = json.loads(config) if isinstance(config, str) else config or {}
    base = (config.get("train") or {}).get("init_from")
    if not base:
        raise ValueError(
            f"{workdir} is a LoRA run without train.init_from in its meta: name its base explicitly"
        )
    return base


def load_model(
    path: str, step: int | None = None, mesh=None, base: str | None = None
) -> tuple[model.ModelConfig, Params]:
    """(ModelConfig, params) of a training workdir's latest (or given) checkpoint, or of an HF directory.

    A LoRA run stores only its adapters (and a fresh scalar head): they come back on top of the frozen base
    they were trained on, ``base`` or the run's own ``train.init_from`` (itself a workdir or HF directory).
    """
    if os.path.isfile(os.path.join(path, "config.json")):
        from gptjax import hf

        return hf.load(path, mesh=mesh)
    step, meta = load_meta(path, step)
    cfg = model_config_from_meta(meta)
    target = _target(cfg, mesh)
    mngr = manager(path, create=False)
    where = f"{_ckpt_dir(path)}/{step}"
    if cfg.lora_rank == 0:
        check_params(mngr, step, target, where=where)
        return cfg, mngr.restore(step, args=ocp.args.Composite(params=_params_restore(target))).params

    from gptjax import lora

    base_path = base or lora_base_path(path, meta)
    base_cfg, base_params = load_model(base_path, mesh=mesh)
    if base_cfg.lora_rank:
        base_cfg, base_params = lora.merge(base_cfg, base_params)
    diff = [f for f in model.ARCH_FIELDS if getattr(base_cfg, f) != getattr(cfg, f)]
    if diff:
        raise ValueError(f"base {base_path} of the LoRA run {path} differs in {diff}; name the right base")
    trained, frozen_target = lora.split(target, also=model.head_params(cfg))
    check_params_like(base_params, frozen_target, where=f"base {base_path} of {path}")
    check_params(mngr, step, trained, where=where)
    adapters = mngr.restore(step, args=ocp.args.Composite(params=_params_restore(trained))).params
    frozen_names = set(_flat_shapes(frozen_target))
    frozen = {k: v for k, v in _flat(base_params).items() if k in frozen_names}
    return cfg, lora.combine(adapters, _nest(frozen))


def _flat(tree: Any) -> dict[str, Any]:
    return {_name(path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_params_like(params: Params, target: Params, *, where: str) -> None:
    """Like ``check_params`` for params in memory; an LM head the target lacks is fine (LM -> scalar)."""
    have, want = _flat_shapes(params), _flat_shapes(target)
    problems = [f"  {n}: expected {s}, missing" for n, s in want.items() if n not in have]
    problems += [f"  {n}: has {have[n]}, expected {s}" for n, s in want.items() if n in have and have[n] != s]
    if problems:
        raise ValueError(f"{where} does not match the model config:\n" + "\n".join(sorted(problems)))


def meta_for(model_cfg: model.ModelConfig, stage: str, **extra) -> dict:
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(model_cfg).items()}
    return {"model": fields, "stage": stage, **extra}
