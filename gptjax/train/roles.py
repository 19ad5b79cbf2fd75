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
from gptjax.train import optim
from gptjax.train.stages import Stage

SINGLE = "model"  # the one trained role of a single-model stage


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
    if keyed(roles) and any(r.cfg.lora_rank for r in roles):
        raise ValueError("LoRA adapters are supported for single-model stages only")
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


def _init_one(role: Role, mesh, rng) -> tuple[Any, dict]:
    """(trained params, frozen base) of one role: fresh or from ``init_from``; LoRA trains adapters only."""
    cfg = role.cfg
    params = model.init(cfg, rng, mesh)
    frozen: dict = {}
    if cfg.lora_rank > 0:
        # a scalar head is new to every model that has one: it trains along with the adapters
        adapters, base = lora.split(params, also=model.head_params(cfg))
        params, frozen = adapters, {"base": base}
    if role.init_from:
        target = frozen["base"] if cfg.lora_rank > 0 else params
        # A scalar-head model (reward / value) starts from an LM: the LM head is dropped and the scalar
        # head keeps its fresh (zero) init.
        loaded = checkpoint.load_params(
            role.init_from,
            target,
            role=role.init_role or None,
            ema=role.init_ema,
            allow_missing=model.head_params(cfg),
            allow_extra=("lm_head",) if cfg.head == "scalar" else (),
            cfg=cfg,
        )
        if cfg.lora_rank > 0:
            frozen["base"] = loaded
        else:
            params = loaded
    return params, frozen


def init_trained(roles: list[Role], mesh, rng) -> tuple[Any, dict]:
    """(params, frozen base weights for LoRA): the model's tree, or {role: tree} with several roles."""
    if not keyed(roles):
        return _init_one(roles[0], mesh, rng)
    rngs = jax.random.split(rng, len(roles))
    return {r.name: _init_one(r, mesh, k)[0] for r, k in zip(roles, rngs, strict=True)}, {}


def load_frozen(config: ConfigDict, stage: Stage, roles: list[Role], mesh) -> tuple[dict, tuple]:
    """({name: params}, ((name, ModelConfig), ...)) of the stage's frozen roles, sharded on ``mesh``.

    A frozen role with an empty ``init_from`` starts where the trained model did (DPO's ``ref`` is the SFT
    model the policy starts from). A role the run does without (``stage.unused``: an RL run's reward model
    when ``rollout.rm_weight=0``) is not loaded.
    """
    section = config.get("frozen") or {}
    missing = [name for name in stage.frozen if name not in section]
    if missing:
        raise ValueError(f"stage {config.stage!r} needs frozen role(s) {missing}: add config.frozen.<name>")
    params, cfgs = {}, []
    for name, spec in section.items():
        if name in stage.unused:
            continue
        path, role, ema = spec.init_from, spec.role, spec.ema
        if not path and not keyed(roles):  # where the trained model starts: its role and EMA choice too
            path, role, ema = roles[0].init_from, role or roles[0].init_role, ema or roles[0].init_ema
        if not path:
            raise ValueError(
                f"config.frozen.{name}.init_from is empty and there is no single trained model's init_from "
                "to default to: name the workdir or Hugging Face directory this frozen role loads"
            )
        cfg, params[name] = checkpoint.load_model(path, mesh=mesh, role=role or None, ema=ema)
        cfgs.append((name, cfg))
    return params, tuple(cfgs)


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
