"""Ahead-of-time plan of a config's train step: compiled for a mesh of N devices without allocating anything.

``plan(config, device_memory_gb, ...)`` builds the stage's trained roles, optimizer state, EMA and batch as
abstract arrays in their sharded layouts on the current devices (``scripts/plan.py`` simulates N CPU
devices), lowers and compiles the one jitted train step, and reads the compiler's own numbers: peak memory
per device (``memory_analysis``). FLOPs are the model's (``model.flops_per_token``: 6N plus causal
attention, the count MFU uses; XLA's ``cost_analysis`` counts a scanned layer body once, not per layer).

Attention: a CPU compile would plan the 'xla' reference, which holds [B, H, L, S] scores; the fused kernels
(Pallas, cuDNN) hold only q, k, v, the output and a [B, H, L] log-sum-exp per layer. The plan compiles a
stand-in with exactly that footprint (``flash_footprint``: those residuals, no scores).

Planned stages: pretrain, sft, rm, dpo and ppo's train step (a minibatch of experience plus PPO-ptx rows,
policy and critic with their optimizer states and EMA, the frozen reference and reward model). Frozen roles
are planned with the shapes of the trained role they start from or stand beside (reference = the policy,
reward model = the critic), which is what the recipes do. Not planned yet: PPO's generation step in its
rollout layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from ml_collections import ConfigDict, FrozenConfigDict

from gptjax import attention, model, roles, sharding, stages
from gptjax import state as state_lib
from gptjax import step as step_lib

PLANNED_STAGES = ("pretrain", "sft", "rm", "dpo", "ppo")
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

    @property
    def fits(self) -> bool:
        return self.peak_bytes_per_device <= self.device_memory_bytes


@jax.custom_vjp
def _footprint(q_BLHD, k_BSKD, v_BSKD):
    return _footprint_fwd(q_BLHD, k_BSKD, v_BSKD)[0]


def _footprint_fwd(q_BLHD, k_BSKD, v_BSKD):
    # An output of q's shape that reads k and v (so they stay live), and the kernel's [B, L, H] statistics.
    mix_BS1D = jnp.mean(k_BSKD + v_BSKD, axis=2, keepdims=True)
    out_BLHD = q_BLHD + jnp.mean(mix_BS1D, axis=1, keepdims=True).astype(q_BLHD.dtype)
    lse_BLH = jnp.sum(q_BLHD.astype(jnp.float32), axis=-1)
    return out_BLHD, (q_BLHD, k_BSKD, v_BSKD, out_BLHD, lse_BLH)


def _footprint_bwd(res, dout_BLHD):
    q, k, v, out, lse = jax.lax.optimization_barrier(res)  # every residual is kept, as the kernel keeps it
    dq = dout_BLHD + (out - q) + lse[..., None].astype(q.dtype)
    dk = jnp.broadcast_to(jnp.mean(dq, axis=(1, 2), keepdims=True)[:, :, :1], k.shape).astype(k.dtype)
    return dq, dk + 0 * k, (dk + 0 * v).astype(v.dtype)


_footprint.defvjp(_footprint_fwd, _footprint_bwd)


def flash_footprint(q_BLHD, k_BSKD, v_BSKD, **_):
    """Stand-in for fused attention with its memory footprint and no [B, H, L, S] array (see module doc)."""
    return _footprint(q_BLHD, k_BSKD, v_BSKD)


@contextlib.contextmanager
def _planned_attention():
    saved = attention.attention
    attention.attention = flash_footprint
    try:
        yield
    finally:
        attention.attention = saved


def abstract_batch(config: ConfigDict, stage_name: str, mesh) -> dict:
    """The batch the stage's data source serves, as sharded ShapeDtypeStructs (global batch)."""
    t = config.train
    B, L = t.batch_size, t.seq_len
    i32 = jnp.int32
    if stage_name in ("pretrain", "sft"):
        shapes = {k: ((B, L), i32) for k in ("inputs_BL", "targets_BL", "segment_ids_BL", "positions_BL")}
        shapes["weights_BL"] = ((B, L), jnp.float32)
    elif stage_name in ("rm", "dpo"):
        K = int(config.data.get("num_responses", 0) or 0)
        if K < 2:
            raise ValueError(
                "plan: config.data.num_responses must name K (the responses per prompt) to plan an rm stage"
            )
        shapes = {
            "tokens_BKL": ((B, K, L), i32),
            "lengths_BK": ((B, K), i32),
            "prompt_lengths_BK": ((B, K), i32),
            "valid_BK": ((B, K), jnp.bool_),
        }
    elif stage_name == "ppo":  # a minibatch of experience (gptjax.rl.experience) + PPO-ptx text
        shapes = {k: ((B, L), i32) for k in ("tokens_BL",)}
        shapes.update({k: ((B,), i32) for k in ("prompt_lengths_B", "lengths_B")})
        f32 = jnp.float32
        shapes.update(
            {k: ((B, L), f32) for k in ("old_logp_BL", "old_values_BL", "advantages_BL", "returns_BL")}
        )
        if config.ptx.ratio > 0:
            P, Lp = int(config.ptx.ratio * B), config.ptx.seq_len
            for k in ("inputs_BL", "targets_BL", "segment_ids_BL", "positions_BL"):
                shapes[f"ptx_{k}"] = ((P, Lp), i32)
            shapes["ptx_weights_BL"] = ((P, Lp), f32)
    else:
        raise ValueError(f"plan: stage {stage_name!r} is not planned yet; planned stages: {PLANNED_STAGES}")
    return {
        k: jax.ShapeDtypeStruct(s, d, sharding=jax.sharding.NamedSharding(mesh, sharding.batch_spec(len(s))))
        for k, (s, d) in shapes.items()
    }


def _placed(shapes, shardings):
    """Abstract arrays: each shape / dtype of ``shapes`` with the matching sharding of ``shardings``."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


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
    pattern = re.compile(r"= (\w+)\[([\d,]*)\][^\n]*?op_name=\"([^\"]+)\"")
    for dtype, dims, op in pattern.findall(hlo_text):
        if dtype not in sizes or not dims:
            continue
        nbytes = math.prod(int(d) for d in dims.split(",")) * sizes[dtype]
        key = f"{dtype}[{dims}] {op.split('/')[-1]} ({op[:80]})"
        found[key] = max(found.get(key, 0), nbytes)
    return sorted(found.items(), key=lambda kv: -kv[1])[:top]


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
    stage = stages.get(config.stage)
    if config.stage not in PLANNED_STAGES:
        raise ValueError(f"plan: stage {config.stage!r} is not planned yet; planned stages: {PLANNED_STAGES}")
    mesh = sharding.make_mesh(config.mesh, devices)
    trained = roles.trained_roles(config, stage)
    # Plans are for accelerators: scanned layers unless the config says otherwise.
    trained = [
        dataclasses.replace(
            r, cfg=r.cfg.replace(scan_layers=True if r.cfg.scan_layers is None else r.cfg.scan_layers)
        )
        for r in trained
    ]
    from gptjax.train import check_config, load_loss

    for r in trained:  # what train.py would refuse (e.g. micro-batches that do not split over the devices)
        check_config(config, r.cfg, mesh)
    if any(r.cfg.lora_rank > 0 for r in trained):
        raise ValueError("plan: LoRA stages are not planned yet")
    keyed = roles.keyed(trained)
    cfgs = {r.name: r.cfg for r in trained}
    cfg = trained[0].cfg
    optimizer, schedules = roles.make_optimizer(trained, config.train.steps)
    decay = roles.ema_decays(trained)

    def abstract_params(cfg):
        return _placed(model.param_shapes(cfg), model.param_shardings(cfg, mesh))

    if keyed:
        params = {name: abstract_params(c) for name, c in cfgs.items()}
    else:
        params = abstract_params(cfg)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    ema = tuple(decay) if keyed else decay > 0
    state_shape = jax.eval_shape(lambda p: state_lib.create(p, optimizer, ema=ema), params)
    state_shardings = state_lib.state_shardings(state_shape, param_shardings, mesh)
    abstract_state = _placed(state_shape, state_shardings)
    batch = abstract_batch(config, config.stage, mesh)
    # Frozen roles have the shapes of the trained role they start from or stand beside: DPO's and PPO's
    # reference is the policy (the SFT model), PPO's reward model the critic (initialised from it).
    like = {"ref": "policy" if keyed else roles.SINGLE, "reward": "value"}
    frozen_cfgs = tuple((name, cfgs[like[name]]) for name in stage.frozen)
    frozen = {name: abstract_params(c) for name, c in frozen_cfgs}
    scalars = {"temperature": jax.ShapeDtypeStruct((), jnp.float32)} if config.stage == "ppo" else {}
    ctx = step_lib.Ctx(
        model_cfg=cfg,
        loss_cfg=FrozenConfigDict(config.loss),
        frozen=frozen,
        frozen_cfgs=frozen_cfgs,
        role_cfgs=tuple(cfgs.items()),
        scalars=scalars,
    )
    loss_mod = load_loss(config.loss.name)
    train_step = step_lib.make_train_step(
        loss_mod.loss_fn,
        optimizer,
        micro_batches=config.train.micro_batches,
        ema_decay=decay,
        lr_schedule=schedules if keyed else schedules[roles.SINGLE],
        denominators_fn=getattr(loss_mod, "denominators", None),
        mesh=mesh,
        state_shardings=state_shardings,
        batch_shardings=jax.tree.map(lambda x: x.sharding, batch),
        ctx_shardings=ctx.replace(
            frozen=jax.tree.map(lambda x: x.sharding, frozen),
            scalars={k: sharding.replicated(mesh) for k in scalars},
        ),
    )
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    stand_in = _planned_attention() if fused_attention else contextlib.nullcontext()
    with jax.set_mesh(mesh), stand_in:
        compiled = train_step.lower(abstract_state, batch, rng, ctx).compile()
    mem = compiled.memory_analysis()
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    # jit drops arguments the step does not read (PPO's loss never reads the frozen models the rollout
    # uses); they are on the device all the same.
    held = _bytes_per_device(abstract_state) + _bytes_per_device(frozen) + _bytes_per_device(batch)
    peak += max(0.0, held - mem.argument_size_in_bytes)
    n = mesh.size
    tokens = math.prod(batch[next(iter(batch))].shape)
    flops = sum(model.flops_per_token(c, config.train.seq_len) for c in cfgs.values()) * tokens
    if "ptx_inputs_BL" in batch:  # the policy's LM loss on the pretraining rows
        ptx = batch["ptx_inputs_BL"].shape
        flops += model.flops_per_token(cfgs["policy"], ptx[1]) * math.prod(ptx)
    flops /= n
    return Plan(
        devices=n,
        mesh=dict(mesh.shape),
        params=sum(model.num_params(c) for c in cfgs.values()),
        param_bytes_per_device=_bytes_per_device(params),
        state_bytes_per_device=_bytes_per_device(abstract_state),
        frozen_bytes_per_device=_bytes_per_device(frozen),
        peak_bytes_per_device=float(peak),
        temp_bytes_per_device=float(mem.temp_size_in_bytes),
        flops_per_device=flops,
        device_memory_bytes=device_memory_gb * GiB,
        step_seconds=flops / (mfu * peak_flops_per_device) if peak_flops_per_device else None,
        biggest=_biggest_temporaries(compiled.as_text()),
    )


def table(p: Plan, name: str) -> str:
    """The plan as a Markdown table (what scripts/plan.py prints)."""
    step = f"{p.step_seconds:.2f} s" if p.step_seconds is not None else "n/a"
    rows = [
        ("devices (mesh)", f"{p.devices} ({', '.join(f'{k} {v}' for k, v in p.mesh.items())})"),
        ("trained parameters", f"{p.params / 1e9:.3f} B"),
        ("params per device", f"{p.param_bytes_per_device / GiB:.2f} GiB"),
        ("params + optimizer + EMA per device", f"{p.state_bytes_per_device / GiB:.2f} GiB"),
        ("frozen roles per device", f"{p.frozen_bytes_per_device / GiB:.2f} GiB"),
        ("activations and temporaries per device", f"{p.temp_bytes_per_device / GiB:.2f} GiB"),
        ("peak memory per device", f"{p.peak_bytes_per_device / GiB:.2f} GiB"),
        ("device memory", f"{p.device_memory_bytes / GiB:.0f} GiB: {'fits' if p.fits else 'DOES NOT FIT'}"),
        ("model FLOPs per step per device", f"{p.flops_per_device:.3e}"),
        ("expected step time (at the stated MFU)", step),
    ]
    lines = [f"| {name} | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(lines)
