"""Models by role. Trained roles are updated by the one train step (one for pretrain / SFT / RM / DPO; PPO's
``policy`` and ``value``); frozen roles (``ref``, ``reward``, ...) only score, from ``Ctx.frozen``.

Config: single-model stages keep ``config.model`` + ``config.train.init_from`` (+ ``init_role``, ``init_ema``)
+ ``config.optim``: one trained role named 'model' whose params are the model's own tree. Stages with named
trained roles (PPO's policy and value; GRPO's policy alone) list them in ``config.roles.<name>`` (``model``,
``init_from``, ``init_role``, ``init_ema``, ``optim``): the params tree is then keyed by role, each role with
its own optimizer. Frozen roles are ``config.frozen.<name>`` (``init_from``, ``role``, ``ema``): a workdir
(one role of it, or its EMA) or a Hugging Face directory; their model config comes from that checkpoint.
A trained role's does too with ``model.from_checkpoint=True`` (``checkpoint.load.resolve_model_config``): its
architecture is read from its ``init_from`` before any weight is made; the model keys set on the command
line are checked against it (``check_model_overrides``, from scripts/train.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from ml_collections import ConfigDict

from gptjax import checkpoint, model
from gptjax.interop import lora
from gptjax.losses import ctx as ctx_lib
from gptjax.model import quant
from gptjax.train import optim
from gptjax.train.stages import Stage

SINGLE = ctx_lib.SINGLE  # the one trained role of a single-model stage


@dataclasses.dataclass(frozen=True)
class Role:
    name: str
    cfg: model.ModelConfig
    init_from: str = ""
    init_role: str = ""
    init_ema: bool = False
    optim: Any = None  # the role's optim section (trained roles)


def model_config(model_section: ConfigDict, where: str = "config.model") -> model.ModelConfig:
    """ModelConfig from a config's model section; an unknown key fails with its name."""
    values = model_section.to_dict()
    unknown = model.unknown_fields(values)
    if unknown:
        known = sorted(f.name for f in dataclasses.fields(model.ModelConfig))
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {known}")
    return model.config_from_dict(values)


def trained_roles(config: ConfigDict, stage: Stage) -> list[Role]:
    section = config.get("roles") or {}
    if section:
        roles = [
            Role(
                name,
                model_config(r.model, f"config.roles.{name}.model"),
                r.init_from,
                r.get("init_role", ""),
                r.get("init_ema", False),
                r.optim,
            )
            for name, r in section.items()
        ]
    else:
        t = config.train
        cfg = model_config(config.model)
        if cfg.head != stage.head:
            raise ValueError(
                f"stage {config.stage!r} trains a model with a {stage.head!r} head: set "
                f"config.model.head={stage.head!r} (it is {cfg.head!r})"
            )
        roles = [
            Role(SINGLE, cfg, t.init_from, t.get("init_role", ""), t.get("init_ema", False), config.optim)
        ]
    for r, where in zip(roles, _model_sections(config), strict=True):
        if r.cfg.lora_base_quant and not r.cfg.lora_rank:
            raise ValueError(
                f"{where}.lora_base_quant={r.cfg.lora_base_quant!r} quantises a LoRA role's frozen base: set "
                f"{where}.lora_rank > 0 (or lora_base_quant='')"
            )
    return [
        dataclasses.replace(
            r, cfg=checkpoint.load.resolve_model_config(r.cfg, r.init_from, r.init_role, where=w)
        )
        for r, w in zip(roles, _model_sections(config), strict=True)
    ]


def _model_sections(config: ConfigDict) -> list[str]:
    """Each trained role's model section, as a command line names it: 'config.model' or
    'config.roles.<name>.model'."""
    return [f"config.roles.{name}.model" for name in config.get("roles") or {}] or ["config.model"]


def check_model_overrides(config: ConfigDict, overrides: dict) -> None:
    """One error naming every model key set on the command line (``overrides``: ml_collections' flat
    {'model.n_layers': 4, ...}) that a ``from_checkpoint`` role's checkpoint contradicts, before anything
    is built; keys that agree with it, or name no architecture field, are kept."""
    if config.get("roles"):
        sections = [
            (f"config.roles.{n}.model", r.model, r.init_from, r.get("init_role", ""))
            for n, r in config.roles.items()
        ]
    else:
        t = config.train
        sections = [("config.model", config.model, t.init_from, t.get("init_role", ""))]
    problems = []
    for where, section, init_from, init_role in sections:
        prefix = where.removeprefix("config.") + "."
        keys = {k.removeprefix(prefix): v for k, v in overrides.items() if k.startswith(prefix)}
        if section.get("from_checkpoint") and init_from and keys:
            problems += checkpoint.load.explicit_mismatches(keys, init_from, init_role, where=where)
    if problems:
        raise ValueError(
            "the command line sets model keys that contradict the checkpoint the model is read from "
            "(from_checkpoint=True): " + "; ".join(problems) + ". Drop them, or set from_checkpoint=False "
            "to describe the model yourself."
        )


def keyed(roles: list[Role]) -> bool:
    """Whether the params tree is keyed by role: roles named in ``config.roles`` (PPO's two, GRPO's one
    'policy'), so a loss reads ``params['policy']`` however many roles train beside it."""
    return len(roles) > 1 or roles[0].name != SINGLE


def _init_one(role: Role, mesh, rng) -> tuple[Any, Any]:
    """(trained params, frozen base or None) of one role: fresh or from ``init_from``; a LoRA role trains
    its adapters (and a scalar head) only, on a frozen base held as ``lora_base_quant`` says."""
    cfg = role.cfg
    params = model.init(cfg, rng, mesh)
    adapters = None
    if cfg.lora_rank > 0:  # the adapters start fresh; the rest (base, a scalar head) loads as a model would
        adapters, params = lora.split(params)
    if role.init_from:
        # A scalar-head model (reward / value) starts from an LM: the LM head is dropped and the scalar
        # head keeps its fresh (zero) init; from a reward model it keeps that model's head.
        params = checkpoint.load_params(
            role.init_from,
            params,
            role=role.init_role or None,
            ema=role.init_ema,
            allow_missing=model.head_params(cfg),
            allow_extra=("lm_head",) if cfg.head == "scalar" else (),
            cfg=cfg,
        )
    base = None
    if adapters is not None:  # a scalar head is new to the base model: it trains along with the adapters
        head, base = lora.split(params, also=model.head_params(cfg))
        params = lora.combine(adapters, head)
    if base is not None and cfg.lora_base_quant:
        base = quant.quantize_base(cfg, base, cfg.lora_base_quant, cfg.lora_base_group_size, mesh=mesh)
    return params, base


def init_trained(roles: list[Role], mesh, rng) -> tuple[Any, dict]:
    """(params, frozen): the model's tree, or {role: tree} with roles; ``frozen`` holds the LoRA roles'
    bases as ``{'base': tree}`` (single model) or ``{'base': {role: tree}}`` (``Ctx.frozen``)."""
    if not keyed(roles):
        params, base = _init_one(roles[0], mesh, rng)
        return params, ({} if base is None else {"base": base})
    params, bases = {}, {}
    for r, k in zip(roles, jax.random.split(rng, len(roles)), strict=True):
        params[r.name], base = _init_one(r, mesh, k)
        if base is not None:
            bases[r.name] = base
    return params, ({"base": bases} if bases else {})


def base_alias(name: str, spec: tuple, roles: list[Role]) -> tuple[str, model.ModelConfig] | None:
    """(trained role, its config with the adapters off) when frozen role ``name``, loading ``spec`` =
    (path, role, ema), is exactly a LoRA role's base: the same checkpoint, an LM head, no quantisation
    difference. Such a role (a LoRA policy's reference) is that base with the adapters off, not a copy."""
    for r in roles:
        same = (r.init_from, r.init_role or "", bool(r.init_ema)) == (spec[0], spec[1] or "", bool(spec[2]))
        if r.cfg.lora_rank > 0 and r.init_from and same and not model.head_params(r.cfg):
            return r.name, adapters_off(r.cfg)
    return None


def adapters_off(cfg: model.ModelConfig) -> model.ModelConfig:
    """A LoRA role's config for its base alone (the reference it aliases)."""
    return cfg.replace(lora_rank=0, lora_dropout=0.0, lora_base_quant="")


def load_frozen(config: ConfigDict, stage: Stage, roles: list[Role], mesh) -> tuple[dict, tuple, tuple]:
    """({name: params}, ((name, ModelConfig), ...), aliases) of the stage's frozen roles, sharded on
    ``mesh``.

    A frozen role with an empty ``init_from`` starts where the trained model did (DPO's ``ref`` is the SFT
    model the policy starts from; with named roles, a LoRA policy's). A role the run does without
    (``stage.unused``: an RL run's reward model when ``rollout.rm_weight=0``) is not loaded. A role that is
    a LoRA role's base (``base_alias``) is not loaded either: ``aliases`` = ((name, trained role), ...).
    """
    section = config.get("frozen") or {}
    missing = [name for name in stage.frozen if name not in section]
    if missing:
        raise ValueError(f"stage {config.stage!r} needs frozen role(s) {missing}: add config.frozen.<name>")
    params, cfgs, aliases = {}, [], []
    for name, spec in section.items():
        if name in stage.unused:
            continue
        path, role, ema = spec.init_from, spec.role, spec.ema
        lora_policy = [r for r in roles if r.name in (SINGLE, "policy") and r.cfg.lora_rank > 0]
        if not path and (not keyed(roles) or lora_policy):  # where the (LoRA) policy starts, role, EMA too
            start = lora_policy[0] if lora_policy else roles[0]
            path, role, ema = start.init_from, role or start.init_role, ema or start.init_ema
        alias = base_alias(name, (path, role, ema), roles)
        if alias is not None:
            aliases.append((name, alias[0]))
            cfgs.append((name, alias[1]))
            continue
        if not path:
            raise ValueError(
                f"config.frozen.{name}.init_from is empty and there is no single trained model's init_from "
                "to default to: name the workdir or Hugging Face directory this frozen role loads"
            )
        cfg, params[name] = checkpoint.load_model(path, mesh=mesh, role=role or None, ema=ema)
        cfgs.append((name, cfg))
    return params, tuple(cfgs), tuple(aliases)


def make_optimizer(roles: list[Role], total_steps: int) -> tuple[optax.GradientTransformation, dict]:
    """(optimizer, {role: lr schedule}): each role's clipped AdamW on its own settings, all in one update."""
    schedules = {r.name: optim.make_schedule(r.optim, total_steps) for r in roles}
    if not keyed(roles):
        return optim.make_optimizer(roles[0].optim, total_steps), schedules
    transforms = {r.name: optim.make_optimizer(r.optim, total_steps) for r in roles}

    def labels(params):
        return {name: jax.tree.map(lambda _, n=name: n, tree) for name, tree in params.items()}

    return optax.multi_transform(transforms, labels), schedules


def ema_decays(roles: list[Role]) -> float | dict[str, float]:
    """The EMA decay: one number for a single model, {role: decay} (roles that keep one) otherwise."""
    if not keyed(roles):
        return float(roles[0].optim.ema_decay)
    return {r.name: float(r.optim.ema_decay) for r in roles if r.optim.ema_decay > 0}
