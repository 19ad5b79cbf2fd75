"""``build(config, mesh)``: the one place a run is made from a config (docs/architecture.md).

    run = build(config, mesh)                    # real: params initialised or loaded, frozen roles loaded
    run = build(config, mesh, abstract=True)     # shapes only (the planner): nothing allocated or read
    batch = run.source.next(run.state)
    train_step = run.make_step(batch)            # the one jitted step, for batches shaped like this one

A run is the stage's trained roles (each with its own optimizer settings and ``init_from``), the optimizer
and its schedules, the train state (real or as sharded ``ShapeDtypeStruct``s), the ``Ctx`` (frozen roles'
params and every role's config), the objective (the loss module) and the batch source. ``train.loop.run`` is
build + the loop, the planner (``gptjax.research.plan``) is build(abstract=True) + lower / compile, the PPO
benchmark is build + timers, so all three check the config the same way (``check_config``) and hold the same
state.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from ml_collections import ConfigDict, FrozenConfigDict

from gptjax import data, losses, model
from gptjax.interop import lora
from gptjax.losses import kl as losses_kl
from gptjax.losses import ppo as losses_ppo
from gptjax.model import quant, sharding
from gptjax.rl import rollout_config
from gptjax.train import guard, sources, stages
from gptjax.train import roles as roles_lib
from gptjax.train import state as state_lib
from gptjax.train import step as step_lib

# The model config each frozen role has when it cannot be read from a checkpoint (abstract and fresh runs):
# the trained role it starts from or stands beside, with its head. DPO's and PPO's reference is the policy
# (the SFT model), PPO's reward model the critic (initialised from it); without a critic the reward model
# gets the policy's shapes and a scalar head.
FROZEN_HEADS = {"ref": "lm", "reward": "scalar"}


@dataclasses.dataclass
class Run:
    """Everything the loop, the planner and the benchmarks need of one stage's run."""

    config: ConfigDict
    stage: stages.Stage
    mesh: Any
    roles: list  # trained roles (roles_lib.Role), model configs resolved
    keyed: bool  # params keyed by role (PPO's policy / value; any run of named roles)
    loss: losses.Objective  # the objective (config.loss.name): loss_fn, options, denominators, ...
    optimizer: Any
    schedules: dict  # {role: lr schedule}
    ema_decay: Any  # float, or {role: decay}
    state: state_lib.TrainState  # real arrays, or ShapeDtypeStructs with shardings when abstract
    state_shardings: Any
    ctx: step_lib.Ctx
    source: Any  # the batch source (None when abstract)
    vocab: Any = None

    @property
    def cfgs(self) -> dict[str, model.ModelConfig]:
        """Every role's model config, trained and frozen."""
        return dict(self.ctx.role_cfgs + self.ctx.frozen_cfgs)

    def make_step(self, batch: Any) -> Callable:
        """The one jitted train step for batches shaped like ``batch`` (arrays or ShapeDtypeStructs)."""
        ctx = self.ctx
        return step_lib.make_train_step(
            self.loss.loss_fn,
            self.optimizer,
            micro_batches=self.config.train.micro_batches,
            ema_decay=self.ema_decay,
            lr_schedule=self.schedules if self.keyed else self.schedules[roles_lib.SINGLE],
            denominators_fn=self.loss.denominators,
            mesh=self.mesh,
            state_shardings=self.state_shardings,
            batch_shardings=sharding.batch_shardings(batch, self.mesh),
            ctx_shardings=jax.tree.map(lambda x: x.sharding, ctx),
        )

    def make_eval_step(self) -> Callable:
        return step_lib.make_eval_step(self.loss.loss_fn, self.loss.denominators)


def _at_least(lo: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v >= lo), f"must be >= {lo}"


def _above(lo: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v > lo), f"must be > {lo}"


def _within(lo: float, hi: float, hi_open: bool = False) -> tuple[Callable[[float], bool], str]:
    if hi_open:
        return (lambda v: lo <= v < hi), f"must be in [{lo}, {hi})"
    return (lambda v: lo <= v <= hi), f"must be in [{lo}, {hi}]"


# Bounds of the numeric knobs: (key, predicate, what it needs). A value outside them does not fail loudly
# later: a negative lr trains by gradient ascent, clip_norm < 0 or ema_decay < 0 silently turn clipping or
# the EMA off, ema_decay >= 1 blows the EMA up, *_every = 0 divides by zero after compiling.
OPTIM_BOUNDS = (
    ("lr", *_at_least(0)),  # 0: the params stay where they are
    ("warmup_steps", *_at_least(0)),
    ("min_lr_ratio", *_within(0, 1)),
    ("b1", *_within(0, 1, hi_open=True)),
    ("b2", *_within(0, 1, hi_open=True)),
    ("eps", *_above(0)),
    ("weight_decay", *_at_least(0)),
    ("clip_norm", *_at_least(0)),  # 0: no clipping
    ("ema_decay", *_within(0, 1, hi_open=True)),  # 0: no EMA
)
TRAIN_BOUNDS = (
    ("batch_size", *_at_least(1)),
    ("micro_batches", *_at_least(1)),
    ("seq_len", *_at_least(1)),
    ("log_every", *_at_least(1)),
    ("checkpoint_every", *_at_least(1)),
    ("keep_checkpoints", *_at_least(1)),
    ("eval_every", *_at_least(0)),  # 0: no evaluation during training
    ("divergence_factor", *_at_least(0)),  # 0: no divergence guard
    ("divergence_window", *_at_least(1)),
)
# config.loss options, by name, wherever an objective declares them (PPO's, GRPO's, DPO's, ...)
LOSS_BOUNDS = (
    ("clip", *_above(0)),
    ("clip_low", *_above(0)),
    ("clip_high", *_above(0)),
    ("value_clip", *_at_least(0)),  # 0: no value clipping
    ("vf_coef", *_at_least(0)),
    ("entropy_coef", *_at_least(0)),
    ("ptx_coef", *_at_least(0)),
    ("kl_coef", *_at_least(0)),
    ("beta", *_above(0)),
    ("label_smoothing", *_within(0, 0.5, hi_open=True)),
    ("desirable_weight", *_at_least(0)),
    ("undesirable_weight", *_at_least(0)),
    ("center_coef", *_at_least(0)),
    ("length_norm", *_at_least(0)),  # 0: the row length
)
# Loss options that name one of a fixed set
LOSS_CHOICES = (("aggregation", losses_ppo.AGGREGATIONS), ("kl_estimator", losses_kl.KL_LOSS_ESTIMATORS))


def bound_problems(section: Any, where: str, table: tuple) -> list[str]:
    """One line per key of ``section`` outside its bounds in ``table`` (keys ``section`` lacks are skipped);
    ``where``: the section's path in the config, e.g. 'optim' or 'config.roles.value.optim'."""
    problems = []
    for key, ok, need in table:
        if section is None or key not in section:
            continue
        value = section[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}.{key}={value!r}: must be a number")
        elif not math.isfinite(value) or not ok(value):
            problems.append(f"{where}.{key}={value}: {need}")
    return problems


def check_config(config: ConfigDict, model_cfg: model.ModelConfig, mesh) -> None:
    """What no stage can run with, named; the run, the planner and the benchmarks all call it."""
    t = config.train
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    problems = []
    if t.steps <= 0:
        problems.append(f"train.steps={t.steps} must be > 0")
    problems += bound_problems(t, "train", TRAIN_BOUNDS)
    if t.eval_every > 0 and t.eval_steps < 1:
        problems.append(f"train.eval_steps={t.eval_steps}: must be >= 1 when train.eval_every > 0")
    if config.get("roles"):
        for name, role in config.roles.items():
            problems += bound_problems(role.get("optim"), f"config.roles.{name}.optim", OPTIM_BOUNDS)
    else:
        problems += bound_problems(config.get("optim"), "optim", OPTIM_BOUNDS)
    problems += bound_problems(config.get("loss"), "loss", LOSS_BOUNDS)
    loss_section = config.get("loss") or {}
    problems += [
        f"loss.{key}={loss_section[key]!r}: use one of {choices}"
        for key, choices in LOSS_CHOICES
        if key in loss_section and loss_section[key] not in choices
    ]
    if stages.of_config(config).source == "rollout" and "rollout" in config:
        problems += bound_problems(config.rollout, "rollout", rollout_config.BOUNDS)
    if t.micro_batches >= 1 and t.batch_size % (t.micro_batches * dp):
        problems.append(
            f"train.batch_size={t.batch_size} must be divisible by train.micro_batches ({t.micro_batches}) "
            f"x data-parallel devices ({dp})"
        )
    if t.eval_every and stages.of_config(config).source != "data":
        problems.append(
            f"train.eval_every={t.eval_every}: stage {config.stage!r} has no validation batches (its source "
            "samples them); set it to 0 and evaluate the checkpoints (scripts/pipeline.py does)"
        )
    if t.nonfinite not in guard.POLICIES:
        problems.append(f"train.nonfinite={t.nonfinite!r}: use one of {guard.POLICIES}")
    if t.max_nonfinite_in_a_row < 1:
        problems.append(f"train.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row} must be >= 1")
    if t.seq_len > model_cfg.max_len and model_cfg.pos == "learned":
        problems.append(f"train.seq_len={t.seq_len} exceeds model.max_len={model_cfg.max_len}")
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))


# Stages that train from random weights by design; every other stage starts from an earlier one (SFT from
# pretraining, the reward model, DPO, KTO, rejection sampling and RL from SFT, a critic from the RM).
SCRATCH_STAGES = ("pretrain",)


def random_init_warnings(config: ConfigDict, roles: list) -> list[str]:
    """Warn (and return) one line per trained role with no ``init_from`` in a stage that needs a starting
    model: an SFT, RM, DPO, KTO or RL run from random weights trains on noise, which no error would show."""
    if config.stage in SCRATCH_STAGES:
        return []
    lines = []
    for role in roles:
        if role.init_from:
            continue
        key = f"roles.{role.name}.init_from" if roles_lib.keyed(roles) else "train.init_from"
        lines.append(
            f"stage {config.stage!r} trains role {role.name!r} from random weights: {key} is empty. This "
            f"stage starts from an earlier one: set --config.{key}=<its workdir or a Hugging Face directory>"
        )
        logging.warning("%s", lines[-1])
    return lines


def trained_roles(config: ConfigDict, mesh, adjust: Callable | None = None) -> list:
    """The stage's trained roles with their configs checked (``adjust``: applied to each model config first,
    e.g. the planner's scanned layers)."""
    roles = roles_lib.trained_roles(config, stages.of_config(config))
    if adjust is not None:
        roles = [dataclasses.replace(r, cfg=adjust(r.cfg)) for r in roles]
    for role in roles:
        check_config(config, role.cfg, mesh)
    return roles


def placed(shapes, shardings):
    """Abstract arrays: each shape / dtype of ``shapes`` with the matching sharding of ``shardings``."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def abstract_params(cfg: model.ModelConfig, mesh) -> Any:
    """A model's params as sharded ShapeDtypeStructs: nothing allocated."""
    return placed(model.param_shapes(cfg), model.param_shardings(cfg, mesh))


def standin_frozen_cfgs(stage: stages.Stage, roles: list) -> tuple[tuple, tuple]:
    """(((name, ModelConfig), ...), aliases) of the stage's frozen roles shaped like the trained roles
    (FROZEN_HEADS, adapters off); a LoRA policy's reference is its base (``roles.base_alias``)."""
    cfgs = {r.name: r.cfg for r in roles}
    policy = "policy" if "policy" in cfgs else roles[0].name
    like = {"ref": policy, "reward": "value" if "value" in cfgs else policy}
    out = tuple(
        (name, roles_lib.adapters_off(cfgs[like[name]]).replace(head=FROZEN_HEADS[name]))
        for name in stage.frozen
    )
    lora_ref = "ref" in stage.frozen and cfgs[policy].lora_rank > 0
    return out, ((("ref", policy),) if lora_ref else ())


def abstract_role(cfg: model.ModelConfig, mesh) -> tuple[Any, Any]:
    """(trained params, frozen base or None) of one role as sharded ShapeDtypeStructs: a LoRA role's
    adapters (and scalar head), and its base as held (``lora_base_quant``)."""
    params = abstract_params(cfg, mesh)
    if cfg.lora_rank == 0:
        return params, None
    adapters, base = lora.split(params, also=model.head_params(cfg))
    if cfg.lora_base_quant:
        args = (cfg, cfg.lora_base_quant, cfg.lora_base_group_size)
        base = placed(
            quant.quantized_base_shapes(*args), quant.quantized_base_shardings(args[0], mesh, *args[1:])
        )
    return adapters, base


def build(
    config: ConfigDict,
    mesh,
    *,
    abstract: bool = False,
    fresh: bool = False,
    rng: jax.Array | None = None,
    adjust: Callable | None = None,
    source: bool = True,
    prompts: Any = None,
    ptx: Any = None,
) -> Run:
    """The run ``config`` describes on ``mesh`` (module doc). Call it with ``mesh`` in context
    (``jax.set_mesh``) when it is real.

    ``abstract``: shapes only, frozen roles shaped like the trained roles, no source. ``fresh``: real arrays,
    but every role (frozen ones too, shaped as when abstract) freshly initialised: no checkpoint is read
    (benchmarks). ``adjust``: applied to each trained role's model config. ``source=False`` builds no batch
    source; ``prompts`` / ``ptx`` replace an RL source's prompt and pretraining-text iterators.
    """
    t = config.train
    stage = stages.of_config(config)
    roles = trained_roles(config, mesh, adjust)
    if fresh or abstract:
        roles = [dataclasses.replace(r, init_from="") for r in roles]
    else:
        random_init_warnings(config, roles)
    vocab = None if abstract else data.get_vocabulary(config.data)  # a plan reads no files
    for role in roles if vocab is not None else ():
        if vocab.vocab_size > role.cfg.vocab_size:
            raise ValueError(
                f"role {role.name!r}: model.vocab_size={role.cfg.vocab_size} is smaller than the vocabulary "
                f"({vocab.vocab_size} ids): raise model.vocab_size"
            )
    loss = losses.objective(config.loss.name)
    optimizer, schedules = roles_lib.make_optimizer(roles, t.steps)
    keyed = roles_lib.keyed(roles)
    decays = roles_lib.ema_decays(roles)
    ema = tuple(decays) if keyed else decays > 0

    if abstract:
        held = {r.name: abstract_role(r.cfg, mesh) for r in roles}
        params = {n: p for n, (p, _) in held.items()} if keyed else held[roles[0].name][0]
        bases = {n: b for n, (_, b) in held.items() if b is not None}
        frozen = {"base": bases if keyed else bases[roles[0].name]} if bases else {}
        frozen_cfgs, aliases = standin_frozen_cfgs(stage, roles)
        frozen.update(
            {name: abstract_params(c, mesh) for name, c in frozen_cfgs if name not in dict(aliases)}
        )
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
        state_shape = jax.eval_shape(lambda p: state_lib.create(p, optimizer, ema=ema), params)
        state_shardings = state_lib.state_shardings(state_shape, param_shardings, mesh)
        state = placed(state_shape, state_shardings)
    else:
        rng = jax.random.key(t.seed) if rng is None else rng
        params, frozen = roles_lib.init_trained(roles, mesh, rng)
        if fresh:
            frozen_cfgs, aliases = standin_frozen_cfgs(stage, roles)
            keys = jax.random.split(jax.random.fold_in(rng, 1), max(len(frozen_cfgs), 1))
            fresh_frozen = [
                (nc, k) for nc, k in zip(frozen_cfgs, keys, strict=False) if nc[0] not in dict(aliases)
            ]
            frozen.update({name: model.init(c, k, mesh) for (name, c), k in fresh_frozen})
        else:
            frozen_params, frozen_cfgs, aliases = roles_lib.load_frozen(config, stage, roles, mesh)
            frozen.update(frozen_params)
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
        state = state_lib.create(params, optimizer, ema=ema, param_shardings=param_shardings, mesh=mesh)
        del params
        state_shardings = state_lib.state_shardings(state, param_shardings, mesh)

    ctx = step_lib.Ctx(
        model_cfg=roles[0].cfg,
        loss_cfg=FrozenConfigDict(config.loss),
        frozen=frozen,
        frozen_cfgs=tuple(frozen_cfgs),
        role_cfgs=tuple((r.name, r.cfg) for r in roles),
        aliases=tuple(aliases),
    )
    batch_source = None
    if stage.source == "rollout":
        # The rollout checks its own settings against every role's config (rl.rollout.check_config): done
        # here for abstract runs too, so the planner refuses what a run would refuse.

        rollout_config.check_config(config, {**dict(ctx.role_cfgs), **dict(ctx.frozen_cfgs)}, t.batch_size)
    if source and not abstract:
        per_host = t.batch_size // jax.process_count()
        extra = {"prompts": prompts, "ptx": ptx} if stage.source == "rollout" else {}
        batch_source = sources.make_source(config, stage, batch_size=per_host, ctx=ctx, mesh=mesh, **extra)
    ctx = ctx.replace(scalars=scalars(stage, batch_source, mesh if abstract else None))
    return Run(
        config=config,
        stage=stage,
        mesh=mesh,
        roles=roles,
        keyed=keyed,
        loss=loss,
        optimizer=optimizer,
        schedules=schedules,
        ema_decay=decays,
        state=state,
        state_shardings=state_shardings,
        ctx=ctx,
        source=batch_source,
        vocab=vocab,
    )


def scalars(stage: stages.Stage, source: Any, abstract_mesh=None) -> dict:
    """The loss's dynamic scalars (``ctx.scalars``: traced, so changing them never recompiles): the source's
    ``scalars()`` (an RL source's sampling temperature) as fp32 arrays; replicated shapes on
    ``abstract_mesh`` when the run is abstract."""
    if abstract_mesh is not None:
        names = ("temperature",) if stage.source == "rollout" else ()
        on = sharding.replicated(abstract_mesh)
        return {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=on) for k in names}
    fn = getattr(source, "scalars", None)
    return {k: jnp.asarray(v, jnp.float32) for k, v in (fn() if fn else {}).items()}
