"""Loading models out of checkpoints: a stage's ``init_from`` (a workdir, one role of it, its EMA, or a
Hugging Face directory), frozen roles and the models chat / generate / evaluators sample from, each checked
against the config that will use it (every differing parameter named). Saving and resuming are ``store.py``'s.

A trained role's model config may come from the checkpoint it starts from (``resolve_model_config``, with
``model.from_checkpoint=True``): its architecture is read from config.json or the workdir's meta, before any
weight exists, and the command line's model keys are checked against it in one error
(``explicit_mismatches``).
"""

from __future__ import annotations

import json
import os
import types
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from gptjax import model
from gptjax.checkpoint.store import (
    _abstract,
    _ckpt_dir,
    _flat_shapes,
    _name,
    _params_restore,
    _saved_param_shapes,
    check_intact,
    check_params,
    load_meta,
    manager,
    shape_problems,
)
from gptjax.data import vocab as vocab_lib
from gptjax.interop import hf, lora
from gptjax.model import quant

Params = dict[str, Any]


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
    """'field: a vs b' for each architecture field that differs (``model.arch_differences``: rope fields
    only when rope is used, max_len only for learned positions)."""
    return model.arch_differences(a, b)


def checkpoint_model_config(path: str, role: str | None = None) -> model.ModelConfig:
    """The model config a checkpoint holds, read without its weights: a Hugging Face directory's config.json
    or a workdir's latest meta (one ``role`` of it)."""
    if is_hf_dir(path):
        return hf.config_from_hf(hf.read_config(path), os.path.join(path, "config.json"))
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"init_from {path}: no such directory (a workdir or a Hugging Face directory)"
        )
    return model_config_from_meta(load_meta(path)[1], role)


def _cli_key(where: str, field: str) -> str:
    """The command-line flag of a model key: '--config.model.n_layers'."""
    return f"--{where}.{field}"


def resolve_model_config(
    cfg: model.ModelConfig, init_from: str, init_role: str = "", *, where: str = "config.model"
) -> model.ModelConfig:
    """The model config a trained role runs with, settled before any weight exists.

    ``cfg.from_checkpoint``: the architecture (``model.CHECKPOINT_FIELDS``) comes from ``init_from``'s
    checkpoint (one ``init_role`` of a workdir), everything else (dtypes, head, remat, attention kernel,
    LoRA, a rotary model's max_len: the run's context) from ``cfg``. Otherwise ``cfg`` is used as it is, and
    refused when it cannot take the weights of an existing ``init_from``, every differing field named at
    once. ``where``: the section's path, for the messages.
    """
    if not cfg.from_checkpoint:
        # A checkpoint not there yet (a plan of a later stage) is the loader's to report, when it runs.
        if init_from and os.path.isdir(init_from):
            diff = arch_differences(checkpoint_model_config(init_from, init_role or None), cfg)
            if diff:
                raise ValueError(
                    f"{where} does not describe the model in init_from {init_from} (checkpoint vs config): "
                    + "; ".join(diff)
                    + f". Add {_cli_key(where, 'from_checkpoint')}=True to take the architecture from the "
                    "checkpoint, or set those keys to its values."
                )
        return cfg
    if not init_from:
        raise ValueError(
            f"{where}.from_checkpoint=True but the role has no init_from: name the workdir or Hugging Face "
            "directory its architecture and weights come from"
        )
    ckpt = checkpoint_model_config(init_from, init_role or None)
    fields = [f for f in model.CHECKPOINT_FIELDS if not (f == "max_len" and ckpt.pos == "rope")]
    out = cfg.replace(from_checkpoint=False, **{f: getattr(ckpt, f) for f in fields})
    logging.info(
        "%s: architecture from %s (%s, %d layers, d_model %d, vocab %d)",
        where,
        init_from,
        out.family,
        out.n_layers,
        out.d_model,
        out.vocab_size,
    )
    return out


def explicit_mismatches(
    values: dict, init_from: str, init_role: str = "", *, where: str = "config.model"
) -> list[str]:
    """'--<key>=value, but the checkpoint has X' for each model key in ``values`` (keys a user set by hand,
    e.g. on the command line, with their values) that contradicts ``init_from``'s architecture: the keys a
    ``from_checkpoint`` role would silently replace. Keys that name no architecture field, and those that
    agree (also through defaults: n_kv_heads=None is n_heads), are fine."""
    ckpt = checkpoint_model_config(init_from, init_role or None)
    out = []
    for key, value in values.items():
        if key not in model.CHECKPOINT_FIELDS:
            continue
        try:
            changed = arch_differences(
                ckpt, ckpt.replace(**{key: tuple(value) if isinstance(value, list) else value})
            )
        except ValueError as e:  # no valid config with the checkpoint's other fields
            changed = [str(e)]
        if changed or (key == "family" and value != ckpt.family):
            out.append(f"{_cli_key(where, key)}={value!r}, but the checkpoint has {getattr(ckpt, key)!r}")
    return out


def _load_hf_params(path, target, role, ema, allow_missing, allow_extra, cfg=None) -> Params:
    """A Hugging Face directory's weights into ``target`` (same name rules as ``load_params``)."""
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


def lora_base(workdir: str, meta: dict, role: str | None = None) -> tuple[str, str | None, bool]:
    """(path, role, ema) a LoRA run's frozen base came from: the role's ``init_from`` (``roles.<role>`` of
    a run with named roles, else ``train``), with its ``init_role`` / ``init_ema``."""
    config = meta.get("config")
    config = json.loads(config) if isinstance(config, str) else config or {}
    section = ((config.get("roles") or {}).get(role) if role else None) or config.get("train") or {}
    base = section.get("init_from")
    if not base:
        key = (
            f"roles.{role}.init_from" if role and (config.get("roles") or {}).get(role) else "train.init_from"
        )
        raise ValueError(f"{workdir} is a LoRA run without {key} in its meta: name its base explicitly")
    return base, section.get("init_role") or None, bool(section.get("init_ema", False))


def lora_base_path(workdir: str, meta: dict, role: str | None = None) -> str:
    """Where a LoRA run's (role's) frozen base came from (``lora_base``): a workdir or an HF directory."""
    return lora_base(workdir, meta, role)[0]


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
    ``train.init_from`` (``roles.<role>.init_from`` with roles; itself a workdir or HF directory); a base
    the run held quantised (``lora_base_quant``) comes back as those quantised weights, dequantised.
    """
    if is_hf_dir(path):
        if role or ema:
            raise ValueError(f"{path} is a Hugging Face directory: it has no roles or EMA to choose from")
        return hf.load(path, mesh=mesh)
    step, meta = load_meta(path, step)
    cfg = model_config_from_meta(meta, role)
    target = _target(cfg, mesh)
    if cfg.lora_rank == 0:
        return cfg, load_params(path, target, step=step, role=role, ema=ema)

    base_path, base_role, base_ema = (base, None, False) if base else lora_base(path, meta, role)
    base_cfg, base_params = load_model(base_path, mesh=mesh, role=base_role, ema=base_ema)
    if base_cfg.lora_rank:
        base_cfg, base_params = lora.merge(base_cfg, base_params)
    if cfg.lora_base_quant:  # the base the adapters were trained on: its quantised weights, dequantised
        base_params = quant.round_trip(base_cfg, base_params, cfg.lora_base_quant, cfg.lora_base_group_size)
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


def load_vocabulary(path: str, step: int | None = None):
    """The vocabulary a model was trained with: an HF directory's tokenizer, or a workdir's ``data.vocab``
    (its run config in the checkpoint meta; bytes when the meta has none)."""
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
