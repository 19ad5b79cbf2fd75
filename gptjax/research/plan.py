"""Ahead-of-time plan of a config's train step: compiled for a mesh of N devices without allocating anything.

``plan(config, device_memory_gb, ...)`` builds the stage's trained roles, optimizer state, EMA and batch as
abstract arrays in their sharded layouts on the current devices (``scripts/plan.py`` simulates N CPU
devices), lowers and compiles the one jitted train step, and reads the compiler's own numbers: peak memory
per device (``memory_analysis``). FLOPs are the model's (``model.flops_per_token``: 6N plus causal
attention, the count MFU uses; XLA's ``cost_analysis`` counts a scanned layer body once, not per layer).

Attention: a CPU compile would plan the 'xla' reference, which holds [B, H, L, S] scores; the fused kernels
(Pallas, cuDNN) hold only q, k, v, the output and a [B, H, L] log-sum-exp per layer. The plan compiles a
stand-in with exactly that footprint (``gptjax.research.footprint``: those residuals, no scores).

Planned stages: pretrain, sft, rm, dpo and ppo's train step (a minibatch of experience plus PPO-ptx rows,
policy and critic with their optimizer states and EMA, the frozen reference and reward model); grpo and
rloo the same without the critic. Frozen roles are planned with the shapes of the trained role they start
from or stand beside (reference = the policy, reward model = the critic), which is what the recipes do;
without a critic (grpo, rloo) the reward model is planned with the policy's shapes and a scalar head (too
much memory when the reward model is the smaller one, too little when it is the larger). ``plan_rollout``
plans an RL stage's two other programs, generation in its rollout layout and the experience pass, each
beside the resident train state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict, FrozenConfigDict

from gptjax import model
from gptjax.data import formats as data_formats
from gptjax.model import sample, sharding
from gptjax.research.footprint import planned_attention
from gptjax.rl import policy as policy_lib
from gptjax.rl import rollout
from gptjax.train import build, stages

PLANNED_STAGES = ("pretrain", "sft", "rm", "dpo", "ppo", "grpo", "rloo")
RL_STAGES = tuple(n for n, s in stages.STAGES.items() if s.source == "rollout")  # ``plan_rollout``'s
GiB = 2**30


@dataclasses.dataclass
class Plan:
    devices: int
    mesh: dict[str, int]
    params: int  # trained parameters (all roles)
    param_bytes_per_device: float  # trained params, sharded
    state_bytes_per_device: float  # params + optimizer state + EMA, sharded
    frozen_bytes_per_device: float  # frozen roles (reference, reward model), sharded
    peak_bytes_per_device: float  # the compiler's: arguments + outputs - donated + temporaries
    temp_bytes_per_device: float  # activations and other temporaries
    flops_per_device: float  # model FLOPs per step (6N + attention), per device
    device_memory_bytes: float
    step_seconds: float | None  # at the stated MFU and peak
    biggest: list[tuple[str, float]]  # the largest temporaries: (what, bytes)
    kv_cache_bytes_per_device: float | None = None  # generation: the KV cache, counted in its own dtype

    @property
    def fits(self) -> bool:
        return self.peak_bytes_per_device <= self.device_memory_bytes


def abstract_batch(config: ConfigDict, stage_name: str, mesh) -> dict:
    """The batch the stage's source serves, as sharded ShapeDtypeStructs (global batch).

    A data stage's batch has its data format's shapes (``gptjax.data.formats``); an RL stage's train step
    reads a minibatch of experience (``gptjax.rl.experience``: the rollout's, not a data format's, so it is
    described here) plus PPO-ptx rows, which are the 'pretrain' format's batch.
    """
    if stage_name not in PLANNED_STAGES:
        raise ValueError(f"plan: stage {stage_name!r} is not planned yet; planned stages: {PLANNED_STAGES}")
    stage = stages.of_config(config) if stage_name == config.stage else stages.get(stage_name)
    B, L = config.train.batch_size, config.train.seq_len
    i32, f32 = jnp.int32, jnp.float32
    if stage.source != "rollout":
        try:
            shapes = data_formats.get(stage.data).shapes(B, L, config.data)
        except ValueError as e:
            raise ValueError(f"plan: {e}") from None
    else:
        shapes = {"tokens_BL": ((B, L), i32)}
        shapes.update({k: ((B,), i32) for k in ("prompt_lengths_B", "lengths_B")})
        obj = stage.objective
        group = ("ref_logp_BL",)  # a group objective's: the reference's log-probs instead of a critic's
        critic = ("old_values_BL", "returns_BL")
        floats = ("old_logp_BL", "advantages_BL", *(critic if obj.critic else group))
        shapes.update({k: ((B, L), f32) for k in floats})
        if "ptx_coef" in obj.options and config.ptx.ratio > 0:  # as the rollout adds them
            P, Lp = int(config.ptx.ratio * B), config.ptx.seq_len
            ptx = data_formats.get("pretrain").shapes(P, Lp, config.ptx.data)
            shapes.update({f"ptx_{k}": v for k, v in ptx.items()})
    return {
        k: jax.ShapeDtypeStruct(s, d, sharding=jax.sharding.NamedSharding(mesh, sharding.batch_spec(len(s))))
        for k, (s, d) in shapes.items()
    }


def _bytes_per_device(tree) -> float:
    total = 0.0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def _biggest_temporaries(hlo_text: str, top: int = 5) -> list[tuple[str, float]]:
    """The largest arrays an instruction of the optimised program produces, with the op that made them."""
    sizes = {
        "f32": 4,
        "bf16": 2,
        "f16": 2,
        "s32": 4,
        "u32": 4,
        "pred": 1,
        "s8": 1,
        "u8": 1,
        "f64": 8,
        "s64": 8,
    }
    found: dict[str, float] = {}
    pattern = re.compile(r"= (\w+)\[([\d,]*)\](?:\{[^}]*\})? ([\w-]+)\([^\n]*?op_name=\"([^\"]+)\"")
    for dtype, dims, opcode, op in pattern.findall(hlo_text):
        if dtype not in sizes or not dims or opcode == "parameter":  # arguments are not temporaries
            continue
        nbytes = math.prod(int(d) for d in dims.split(",")) * sizes[dtype]
        key = f"{dtype}[{dims}] {op.split('/')[-1]} ({op[:80]})"
        found[key] = max(found.get(key, 0), nbytes)
    return sorted(found.items(), key=lambda kv: -kv[1])[:top]


@dataclasses.dataclass
class _Setup:
    """What every planned program of a stage shares: the abstract run (``build(abstract=True)``: the trained
    roles' sharded state, the frozen roles' params) and views of it."""

    run: build.Run

    @property
    def mesh(self):
        return self.run.mesh

    @property
    def cfgs(self) -> dict[str, model.ModelConfig]:  # trained roles
        return {r.name: r.cfg for r in self.run.roles}

    @property
    def params(self):
        return self.run.state.params

    @property
    def state(self):
        return self.run.state

    @property
    def frozen(self) -> dict:
        return self.run.ctx.frozen

    @property
    def frozen_cfgs(self) -> tuple:
        return self.run.ctx.frozen_cfgs


def _scanned(cfg: model.ModelConfig) -> model.ModelConfig:
    # Plans are for accelerators: scanned layers unless the config says otherwise.
    return cfg.replace(scan_layers=True if cfg.scan_layers is None else cfg.scan_layers)


def _setup(config: ConfigDict, devices) -> _Setup:
    if config.stage not in PLANNED_STAGES:
        raise ValueError(f"plan: stage {config.stage!r} is not planned yet; planned stages: {PLANNED_STAGES}")
    mesh = sharding.make_mesh(config.mesh, devices)
    # The same builder (and config checks) as a run: frozen roles shaped like the trained ones they start
    # from or stand beside (build.standin_frozen_cfgs), nothing allocated.
    return _Setup(build.build(config, mesh, abstract=True, adjust=_scanned))


def _peak(compiled, held: float) -> tuple[float, Any]:
    """The compiler's peak (arguments + outputs - donated + temporaries) plus what is on the device beside
    the program's arguments: ``held`` is every byte resident while it runs (jit drops arguments the
    program does not read; the train state stays on the device during a rollout)."""
    mem = compiled.memory_analysis()
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return float(peak + max(0.0, held - mem.argument_size_in_bytes)), mem


def _plan_of(s: _Setup, compiled, held: float, flops: float, seconds, mesh, device_memory_gb: float) -> Plan:
    """A compiled program's plan with the setup's state beside it (``held``: bytes resident while it runs)."""
    peak, mem = _peak(compiled, held)
    return Plan(
        devices=mesh.size,
        mesh=dict(mesh.shape),
        params=sum(math.prod(x.shape) for x in jax.tree.leaves(s.params)),  # LoRA: the adapters
        param_bytes_per_device=_bytes_per_device(s.params),
        state_bytes_per_device=_bytes_per_device(s.state),
        frozen_bytes_per_device=_bytes_per_device(s.frozen),
        peak_bytes_per_device=peak,
        temp_bytes_per_device=float(mem.temp_size_in_bytes),
        flops_per_device=flops,
        device_memory_bytes=device_memory_gb * GiB,
        step_seconds=seconds,
        biggest=_biggest_temporaries(compiled.as_text()),
    )


def plan(
    config: ConfigDict,
    device_memory_gb: float,
    *,
    mfu: float = 0.4,
    peak_flops_per_device: float | None = 989e12,
    fused_attention: bool = True,
    devices: list | None = None,
) -> Plan:
    """Compile ``config``'s train step for the current devices (abstractly) and read its cost (module doc).

    ``fused_attention=False`` plans the config's own attention as this backend compiles it (on CPU the
    'xla' reference with its [B, H, L, S] scores) instead of the fused kernels' footprint.
    """
    s = _setup(config, devices)
    mesh, cfgs = s.mesh, s.cfgs
    batch = abstract_batch(config, config.stage, mesh)
    train_step = s.run.make_step(batch)
    ctx = s.run.ctx
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    stand_in = planned_attention() if fused_attention else contextlib.nullcontext()
    with jax.set_mesh(mesh), stand_in:
        compiled = train_step.lower(s.state, batch, rng, ctx).compile()
    held = _bytes_per_device(s.state) + _bytes_per_device(s.frozen) + _bytes_per_device(batch)
    tokens = math.prod(batch[next(iter(batch))].shape)
    flops = sum(model.flops_per_token(c, config.train.seq_len) for c in cfgs.values()) * tokens
    if "ptx_inputs_BL" in batch:  # the policy's LM loss on the pretraining rows
        ptx = batch["ptx_inputs_BL"].shape
        flops += model.flops_per_token(cfgs["policy"], ptx[1]) * math.prod(ptx)
    flops /= mesh.size
    seconds = flops / (mfu * peak_flops_per_device) if peak_flops_per_device else None
    return _plan_of(s, compiled, held, flops, seconds, mesh, device_memory_gb)


def plan_rollout(
    config: ConfigDict,
    device_memory_gb: float,
    *,
    mfu: float = 0.4,
    peak_flops_per_device: float | None = 989e12,
    hbm_bytes_per_second: float = 3.35e12,
    devices: list | None = None,
) -> dict[str, Plan]:
    """An RL stage's rollout (ppo, grpo, rloo): the two programs besides the update (``gptjax.rl.rollout``),
    each with the train state and the frozen roles resident beside it:

    - ``generate``: ``sample.generate`` of ``rollout.batch_size`` rows (``samples_per_prompt`` responses to
      each prompt) on the rollout mesh
      (``rollout.mesh``, else the update's), with the policy's params moved to that layout (a copy in param
      dtype, an argument) and cast to the compute dtype inside, the KV cache of ``prompt_len +
      max_new_tokens`` slots per row, prefill and the decode loop. Time: the prefill's FLOPs at ``mfu``
      plus one read of the device's weights (compute dtype) and KV cache per new token at
      ``hbm_bytes_per_second`` (decoding is bandwidth-bound; H100 SXM: 3.35e12).
    - ``score``: the experience pass (``rl.experience``: a forward pass of each role, four for PPO and
      three without a critic, in row chunks as the rollout runs them) over the rollout batch in the update
      layout; fused attention as in ``plan``.
    """
    if config.stage not in RL_STAGES:
        raise ValueError(f"plan_rollout: stage {config.stage!r} has no rollout (those that do: {RL_STAGES})")
    s = _setup(config, devices)
    r = config.rollout
    mesh = s.mesh
    resident = _bytes_per_device(s.state) + _bytes_per_device(s.frozen)
    cfgs = {**s.cfgs, **dict(s.frozen_cfgs)}  # the build checked them as a run does (rollout.check_config)
    R, P, T = r.batch_size, r.prompt_len, r.max_new_tokens
    n = mesh.size
    i32, f32 = jnp.int32, jnp.float32

    def common(compiled, held, flops, seconds, on) -> Plan:
        return _plan_of(s, compiled, held, flops, seconds, on, device_memory_gb)

    def at(m, shape, dtype, spec):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=jax.sharding.NamedSharding(m, spec))

    def scalar(m, dtype):
        return at(m, (), dtype, jax.sharding.PartitionSpec())

    def compute_seconds(flops):
        return flops / (mfu * peak_flops_per_device) if peak_flops_per_device else 0.0

    # -- generation, in the rollout layout: ``rollout.generate_rows`` prompts per call
    G = r.generate_rows or R
    # a LoRA policy generates with its adapters on the base, or merged into a copy (rl.policy)
    pcfg = policy_lib.generation_config(cfgs["policy"], r.lora_generation)
    if r.mesh:  # the policy moved to the rollout layout, cast to the compute dtype first (a copy)
        gmesh = sharding.make_mesh(r.mesh, devices=list(mesh.devices.flat))
        shapes = jax.eval_shape(lambda p: sample.cast_to_compute_dtype(pcfg, p), model.param_shapes(pcfg))
        policy = build.placed(shapes, model.param_shardings(pcfg, gmesh))
        copy = _bytes_per_device(policy)
    elif pcfg is not cfgs["policy"]:  # merged: a generation copy of the weights beside the base
        gmesh, policy = mesh, build.abstract_params(pcfg, mesh)
        copy = _bytes_per_device(policy)
    else:  # the train state's own params (already resident; a LoRA policy's adapters on its base)
        gmesh, copy = mesh, 0.0
        policy = policy_lib.experience_params(s.run.ctx, s.params, ("policy",))["policy"]
    prompts = at(gmesh, (G, P), i32, sharding.batch_spec(2))
    lengths = at(gmesh, (G,), i32, sharding.batch_spec(1))
    rng = scalar(gmesh, jax.random.key(0).dtype)
    with jax.set_mesh(gmesh), planned_attention():
        compiled = sample._generate.lower(
            pcfg,
            policy,
            prompts,
            lengths,
            rng,
            scalar(gmesh, f32),
            scalar(gmesh, f32),
            scalar(gmesh, i32),
            scalar(gmesh, i32),
            max_new_tokens=T,
            greedy=r.temperature == 0.0,
            top_k=0,
            use_top_p=False,
            cache_dtype=None,
        ).compile()
    held = resident + copy + _bytes_per_device((prompts, lengths))
    weights = sum(  # what each new token reads: the device's weights in the compute dtype (or as held)
        math.prod(x.sharding.shard_shape(x.shape)) * min(x.dtype.itemsize, jnp.dtype(pcfg.dtype).itemsize)
        for x in jax.tree.leaves(policy)
    )
    cache = jax.eval_shape(lambda: model.init_cache(pcfg, G, P + T))
    cache_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(cache))
    cache_bytes /= gmesh.shape["data"] * gmesh.shape["fsdp"] * min(gmesh.shape["tensor"], pcfg.kv_heads)
    forward = lambda c, tokens, seq: model.flops_per_token(c, seq) / 3 * tokens / n  # no backward
    per_call = compute_seconds(forward(pcfg, G * P, P)) + T * (weights + cache_bytes) / hbm_bytes_per_second
    flops = forward(pcfg, R * (P + T), P + T)
    plans = {"generate": common(compiled, held, flops, R // G * per_call, gmesh)}
    plans["generate"].kv_cache_bytes_per_device = cache_bytes

    # -- the experience pass, in the update layout
    L = P + T
    # policy (and critic; LoRA roles on their base), ref (a LoRA policy's: its base), reward
    params = policy_lib.experience_params(s.run.ctx, s.params, tuple(sorted(cfgs)))
    group = rollout.advantages_kwargs(config)  # a critic-free objective's advantages, as in the rollout
    batch = [at(mesh, (R, L), i32, sharding.batch_spec(2))]
    batch += [at(mesh, (R,), d, sharding.batch_spec(1)) for d in (i32, i32, jnp.bool_)]
    opts = FrozenConfigDict(
        {
            **r.to_dict(),
            "reward_at": rollout.reward_at(config),  # as the rollout reads it: the RM's trained setting
            "score_rows": rollout.score_rows(config, cfgs, mesh),
        }
    )
    with jax.set_mesh(mesh), planned_attention():
        compiled = rollout._experience.lower(
            params,
            *batch,
            scalar(mesh, f32),
            scalar(mesh, f32),
            cfgs=tuple(sorted(cfgs.items())),
            opts=opts,
            **group,
        ).compile()
    held = resident + _bytes_per_device(batch)
    flops = sum(forward(c, R * L, L) for c in cfgs.values())
    plans["score"] = common(compiled, held, flops, compute_seconds(flops), mesh)
    return plans


def table(p: Plan | dict[str, Plan], name: str) -> str:
    """The plan as a Markdown table (what scripts/plan.py prints); a dict of plans (PPO's update, generate,
    score) gives one column each."""
    plans = p if isinstance(p, dict) else {"": p}
    GB = lambda b: f"{b / GiB:.2f} GiB"
    rows = [
        ("devices (mesh)", lambda p: f"{p.devices} ({', '.join(f'{k} {v}' for k, v in p.mesh.items())})"),
        ("trained parameters", lambda p: f"{p.params / 1e9:.3f} B"),
        ("params per device", lambda p: GB(p.param_bytes_per_device)),
        ("params + optimizer + EMA per device", lambda p: GB(p.state_bytes_per_device)),
        ("frozen roles per device", lambda p: GB(p.frozen_bytes_per_device)),
        ("activations and temporaries per device", lambda p: GB(p.temp_bytes_per_device)),
        ("peak memory per device", lambda p: GB(p.peak_bytes_per_device)),
        (
            "device memory",
            lambda p: f"{p.device_memory_bytes / GiB:.0f} GiB: {'fits' if p.fits else 'DOES NOT FIT'}",
        ),
        ("model FLOPs per step per device", lambda p: f"{p.flops_per_device:.3e}"),
        (
            "expected step time (at the stated MFU)",
            lambda p: f"{p.step_seconds:.2f} s" if p.step_seconds else "n/a",
        ),
    ]
    if any(p.kv_cache_bytes_per_device for p in plans.values()):
        kv = lambda p: GB(p.kv_cache_bytes_per_device) if p.kv_cache_bytes_per_device else ""
        rows.insert(6, ("KV cache per device (in its dtype)", kv))
    head = f"| {name} | " + " | ".join(plans) + " |"
    lines = [head, "|---|" + "---|" * len(plans)]
    lines += [f"| {k} | " + " | ".join(f(p) for p in plans.values()) + " |" for k, f in rows]
    return "\n".join(lines)
