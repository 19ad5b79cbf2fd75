"""Orbax checkpoints: save every N steps and at the end, keep the last K, resume from the workdir, and
initialise a new stage from an earlier stage's params (``init_from``).

A checkpoint step holds separate items so that a later stage can read the params alone:
``params`` (the trained params; with several trained roles a dict keyed by role), ``ema`` (the EMA of the
params, when kept), ``opt`` (optimizer state and step) as arrays, ``data`` (the batch source's position) and
``meta`` (stage, each role's model config, the run config) as JSON. Any role of a workdir, or its EMA, loads
on its own: ``load_model(workdir, role="value", ema=True)``.

Orbax writes a step into a temporary directory and renames it when complete, so a kill during a save leaves
the earlier steps as they were. A resume takes the newest step that restores (``restore_latest``); a step
with a missing or unreadable file is reported as damaged (``DamagedCheckpoint``, naming the file), never
as another model's checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
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
        "ema": ocp.PyTreeCheckpointHandler(),
        "opt": ocp.StandardCheckpointHandler(),
        "data": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(_ckpt_dir(workdir), options=options, item_handlers=handlers)


def save(mngr: ocp.CheckpointManager, state: TrainState, *, data_state: dict | None, meta: dict) -> None:
    """Write one step (async; call ``mngr.wait_until_finished()`` before exiting)."""
    step = int(jax.device_get(state.step))
    items = dict(
        params=ocp.args.PyTreeSave(state.params),
        opt=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
        data=ocp.args.JsonSave(data_state or {}),
        meta=ocp.args.JsonSave(meta),
    )
    if state.ema_params is not None:
        items["ema"] = ocp.args.PyTreeSave(state.ema_params)
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


class DamagedCheckpoint(RuntimeError):
    """A checkpoint step that cannot be read: one of its files is missing, cut short or unreadable."""

    def __init__(self, step: int, path: str, detail: str):
        super().__init__(f"checkpoint step {step} is damaged: {path}: {detail}")
        self.step, self.path = step, path


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


def _damaged(e: Exception, step: int, step_dir: str) -> DamagedCheckpoint | None:
    """A read error ``e`` as the damage of a named file; None when it is not about the files."""
    text = str(e)
    files = re.findall(r'local file "([^"]+)"', text)  # TensorStore names the directory, then the file
    if files:
        return DamagedCheckpoint(step, files[-1], text.split(" [tensorstore_spec")[0][:500])
    if isinstance(e, (OSError, json.JSONDecodeError)):
        return DamagedCheckpoint(step, getattr(e, "filename", None) or step_dir, f"{type(e).__name__}: {e}")
    return None


def restore(
    mngr: ocp.CheckpointManager, state: TrainState, step: int | None = None
) -> tuple[TrainState, dict]:
    """Restore (state, data_state) into the layout of ``state`` (an initialised or abstract state).

    Raises ``DamagedCheckpoint`` for a step whose files are missing or unreadable, ``ValueError`` for an
    intact one of another model."""
    step = mngr.latest_step() if step is None else step
    names = ("params", "opt", "data") + (("ema",) if state.ema_params is not None else ())
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
    )
    if state.ema_params is not None:
        items["ema"] = _params_restore(state.ema_params)
    try:
        check_params(mngr, step, state.params, where=f"{mngr.directory}/{step}")  # reads the arrays' metadata
        out = mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
        damaged = _damaged(e, step, step_path(mngr, step))
        if damaged is None:
            raise
        raise damaged from e
    restored = TrainState(
        step=out.opt["step"],
        params=out.params,
        opt_state=out.opt["opt_state"],
        ema_params=out.ema if state.ema_params is not None else None,
    )
    return restored, dict(out.data or {})


def restore_latest(mngr: ocp.CheckpointManager, state: TrainState) -> tuple[TrainState, dict, int] | None:
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
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    mngr.reload()
    return dest


def _name(path) -> str:
    """'blocks/attn/wq': a param's key path as one string (the names errors and logs use)."""
    return "/".join(str(getattr(p, "key", p)) for p in path)


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
) -> None:
    """Raise naming every parameter whose shape differs, is missing from, or is extra in the checkpoint."""
    problems = shape_problems(
        _saved_param_shapes(mngr, step, item, prefix), _flat_shapes(target), allow_missing, allow_extra
    )
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


def roles_of(meta: dict) -> dict[str, dict]:
    """{role: model-config fields} of a checkpoint's meta; a single-model run holds one role, 'model'."""
    return meta.get("roles") or {"model": meta["model"]}


def _role(meta: dict, role: str | None, where: str) -> tuple[str, str]:
    """(role, key prefix of its params): runs with several trained roles key their params by role."""
    roles = roles_of(meta)
    if not role:
        if len(roles) > 1:
            raise ValueError(f"{where} holds the roles {sorted(roles)}: name the one to load (role=...)")
        role = next(iter(roles))
    if role not in roles:
        raise ValueError(f"{where} has no role {role!r}; it holds {sorted(roles)}")
    return role, (f"{role}/" if meta.get("keyed_by_role") else "")


def model_config_from_meta(meta: dict, role: str | None = None) -> model.ModelConfig:
    fields_in_meta = roles_of(meta)[_role(meta, role, "checkpoint")[0]]
    unknown = model.unknown_fields(fields_in_meta)
    if unknown:
        raise ValueError(
            f"checkpoint model config has field(s) {unknown} that this version of gptjax.model.ModelConfig "
            "does not know: it was written by a different version; use that version to read it"
        )
    return model.config_from_dict(fields_in_meta)


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_params(
    path: str,
    target: Params,
    *,
    step: int | None = None,
    role: str | None = None,
    ema: bool = False,
    allow_missing: tuple[str, ...] = (),
    allow_extra: tuple[str, ...] = (),
    cfg: model.ModelConfig | None = None,
) -> Params:
    """Params of an earlier run (a workdir: one ``role`` of it, optionally its ``ema``) or of a Hugging Face
    directory, restored into ``target``'s shapes, dtypes and shardings.

    Names in ``allow_missing`` (absent from the checkpoint) keep their value from ``target`` (e.g. a fresh
    scalar head for a reward model initialised from an SFT model); names in ``allow_extra`` (in the
    checkpoint, not in the model, e.g. the SFT model's LM head) are ignored. Any other difference is an error.
    With ``cfg`` (the target's model config), an HF checkpoint of another architecture (norm, activation,
    rope settings: what shapes cannot show) is refused too.
    """
    if is_hf_dir(path):
        return _load_hf_params(path, target, role, ema, allow_missing, allow_extra, cfg)
    mngr = manager(path, create=False)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"init_from: no checkpoint in {_ckpt_dir(path)}")
    _, meta = load_meta(path, step)
    role, prefix = _role(meta, role, path)
    if cfg is not None:  # what the shapes cannot show: norms, activation, positions, rope settings
        diff = [
            d
            for d in arch_differences(model_config_from_meta(meta, role), cfg)
            if d.split(":")[0] in model.UNSHAPED_FIELDS
        ]
        if diff:
            raise ValueError(
                f"init_from {path} (role {role!r}) was trained with another architecture than the model "
                f"config (checkpoint vs config): {'; '.join(diff)}. Set those model keys to the checkpoint's "
                "values."
            )
    item = "ema" if ema else "params"
    has_ema = item in os.listdir(os.path.join(_ckpt_dir(path), str(step)))
    if has_ema or not ema:
        check_intact(mngr, step, (item,))
    if ema and (not has_ema or not _saved_param_shapes(mngr, step, item, prefix)):
        raise ValueError(f"{path} step {step} has no EMA weights of role {role!r} (optim.ema_decay was 0)")
    where = f"{_ckpt_dir(path)}/{step}" + (
        f" (role {role!r}{', EMA' if ema else ''})" if prefix or ema else ""
    )
    check_params(
        mngr,
        step,
        target,
        where=where,
        allow_missing=allow_missing,
        allow_extra=allow_extra,
        item=item,
        prefix=prefix,
    )
    saved = _saved_param_shapes(mngr, step, item, prefix)
    wanted = {prefix + name: x for name, x in _flat(target).items() if name in saved}
    restore_tree = _nest({k: _abstract(v) for k, v in wanted.items()})
    out = mngr.restore(step, args=ocp.args.Composite(**{item: _params_restore(restore_tree, partial=True)}))
    restored = {k[len(prefix) :]: v for k, v in _flat(out[item]).items()}
    logging.info(
        "params from %s step %d%s: %d restored, kept from the target: %s, ignored: %s",
        path,
        step,
        f" role {role}" + (" (EMA)" if ema else ""),
        len(restored),
        sorted(set(_flat_shapes(target)) - set(restored)) or "none",
        sorted(set(saved) - set(restored)) or "none",
    )
    return jax.tree_util.tree_map_with_path(lambda path, x: restored.get(_name(path), x), target)


def arch_differences(a: model.ModelConfig, b: model.ModelConfig) -> list[str]:
    """'field: a vs b' for each architecture field that differs (rope fields only when rope is used)."""
    fields = [f for f in model.ARCH_FIELDS if a.pos == "rope" or not f.startswith("rope")]
    return [f"{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}" for f in fields if getattr(a, f) != getattr(b, f)]


def _load_hf_params(path, target, role, ema, allow_missing, allow_extra, cfg=None) -> Params:
    """A Hugging Face directory's weights into ``target`` (same name rules as ``load_params``)."""
    from gptjax import hf

    if role or ema:
        raise ValueError(f"{path} is a Hugging Face directory: it has no roles or EMA to choose from")
    shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(target)]
    mesh = next((s.mesh for s in shardings if isinstance(s, jax.sharding.NamedSharding)), None)
    hf_cfg, loaded = hf.load(path, mesh=mesh)
    diff = arch_differences(hf_cfg, cfg) if cfg is not None else []
    if diff:
        raise ValueError(
            f"Hugging Face checkpoint {path} has another architecture than the model config (checkpoint vs "
            f"config): {'; '.join(diff)}. Set the model config to match it."
        )
    problems = shape_problems(_flat_shapes(loaded), _flat_shapes(target), allow_missing, allow_extra)
    if problems:
        raise ValueError(
            f"Hugging Face checkpoint {path} does not match the model config:\n" + "\n".join(problems)
        )
    flat = _flat(loaded)

    def place(name_path, x):
        name = _name(name_path)
        if name not in flat:
            return x
        y = flat[name].astype(x.dtype)
        sharding = getattr(x, "sharding", None)
        return jax.device_put(y, sharding) if sharding is not None else y

    logging.info("init_from %s (Hugging Face): %d params restored", path, len(set(flat) & set(_flat(target))))
    return jax.tree_util.tree_map_with_path(place, target)


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

    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes,
        model.param_shardings(cfg, mesh),
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
    path: str,
    step: int | None = None,
    mesh=None,
    base: str | None = None,
    *,
    role: str | None = None,
    ema: bool = False,
) -> tuple[model.ModelConfig, Params]:
    """(ModelConfig, params) of a training workdir's latest (or given) checkpoint, or of an HF directory.

    ``role`` picks one trained role of a multi-role run (e.g. PPO's 'policy' or 'value'; a single-model run
    needs none) and ``ema`` its EMA weights. A LoRA run stores only its adapters (and a fresh scalar head):
    they come back on top of the frozen base they were trained on, ``base`` or the run's own
    ``train.init_from`` (itself a workdir or HF directory).
    """
    if is_hf_dir(path):
        from gptjax import hf

        if role or ema:
            raise ValueError(f"{path} is a Hugging Face directory: it has no roles or EMA to choose from")
        return hf.load(path, mesh=mesh)
    step, meta = load_meta(path, step)
    cfg = model_config_from_meta(meta, role)
    target = _target(cfg, mesh)
    if cfg.lora_rank == 0:
        return cfg, load_params(path, target, step=step, role=role, ema=ema)

    from gptjax import lora

    base_path = base or lora_base_path(path, meta)
    base_cfg, base_params = load_model(base_path, mesh=mesh)
    if base_cfg.lora_rank:
        base_cfg, base_params = lora.merge(base_cfg, base_params)
    diff = arch_differences(base_cfg, cfg)
    if diff:
        raise ValueError(f"base {base_path} of the LoRA run {path} differs in {diff}; name the right base")
    trained, frozen_target = lora.split(target, also=model.head_params(cfg))
    check_params_like(base_params, frozen_target, where=f"base {base_path} of {path}")
    adapters = load_params(path, trained, step=step, role=role, ema=ema)
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


def load_vocabulary(path: str, step: int | None = None):
    """The vocabulary a model was trained with: an HF directory's tokenizer, or a workdir's ``data.vocab``
    (its run config in the checkpoint meta; bytes when the meta has none)."""
    from gptjax.data import vocab as vocab_lib

    if is_hf_dir(path):
        if not os.path.isfile(os.path.join(path, "tokenizer.json")):
            raise FileNotFoundError(f"{path} has no tokenizer.json: name the vocabulary explicitly")
        return vocab_lib.HuggingFaceVocabulary(path)
    config = load_meta(path, step)[1].get("config")
    config = json.loads(config) if isinstance(config, str) else config or {}
    v = (config.get("data") or {}).get("vocab") or {"kind": "byte"}
    vocab = types.SimpleNamespace(kind=v.get("kind", "byte"), path=v.get("path", ""))
    return vocab_lib.get_vocabulary(types.SimpleNamespace(vocab=vocab))


def load_lm(
    path: str, step: int | None = None, *, role: str | None = None, ema: bool = False, vocab: Any = None
) -> tuple[model.ModelConfig, Params, Any]:
    """(cfg, params, vocabulary) of a model to sample from: an LM-head role of a workdir, or an HF
    directory, with the vocabulary it was trained with (or ``vocab``). Scalar heads (reward, value) are
    refused."""
    if not is_hf_dir(path):
        meta_step, meta = load_meta(path, step)
        head = model_config_from_meta(meta, role).head
        if head != "lm":
            which = f"role {role!r} of " if role else ""
            raise ValueError(
                f"{which}{path} (stage {meta.get('stage')!r}) is a model with a {head!r} head: it scores "
                "text and cannot generate it; use a workdir with an LM head (pretrain, sft, dpo, or PPO's "
                "role 'policy')"
            )
        step = meta_step
    cfg, params = load_model(path, step, role=role, ema=ema)
    vocab = vocab or load_vocabulary(path, step)
    if vocab.vocab_size > cfg.vocab_size:
        raise ValueError(f"the vocabulary has {vocab.vocab_size} ids but the model only {cfg.vocab_size}")
    return cfg, params, vocab
