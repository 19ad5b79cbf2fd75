"""THE train step and the eval step, built once from a pure loss function.

A loss has one signature::

    loss_sum, metrics = loss_fn(params, batch, rng, ctx)

``loss_sum`` is a SUM over the batch (tokens, pairs, ...) and ``metrics`` maps names to ``(sum, count)``
pairs; ``metrics["loss"]`` must be ``(loss_sum, count)``. The step adds sums and counts over micro-batches
and divides once, so gradient accumulation is exactly the big-batch gradient of ``sum / count``.

Losses whose terms have different denominators (PPO: policy and value per response token, ptx per
pretraining token) give the step a ``denominators(batch, ctx) -> {name: count}`` function: the step computes
it on the FULL batch before splitting it into micro-batches and hands it to every micro-batch as
``ctx.denominators``, so each term can divide by its full-batch count (and report ``metrics["loss"]`` with
count = its micro-batch's share, summing to 1). Dynamic scalars (a KL coefficient that changes during
training) travel in ``ctx.scalars``: traced values, so changing them never recompiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax.losses.ctx import Ctx, full_params  # noqa: F401 (gptjax.step.Ctx: a public name)
from gptjax.train.state import TrainState

LossFn = Callable[[Any, dict, jax.Array, "Ctx"], tuple[jax.Array, dict]]


def split_micro_batches(batch: dict, micro_batches: int) -> dict:
    """[B, ...] -> [M, B/M, ...]; micro-batch i takes rows i, i+M, ... so each device keeps its own rows."""

    def split(x):
        B = x.shape[0]
        if B % micro_batches:
            raise ValueError(f"batch size {B} is not divisible by micro_batches={micro_batches}")
        return jnp.moveaxis(x.reshape(B // micro_batches, micro_batches, *x.shape[1:]), 1, 0)

    return jax.tree.map(split, batch)


def grads_and_metrics(
    loss_fn: LossFn, params: Any, batch: dict, rng: jax.Array, ctx: Ctx, micro_batches: int = 1
) -> tuple[Any, dict]:
    """Summed gradients and (sum, count) metrics over micro-batches (fp32 accumulation)."""

    def loss_of(p, mb, r):
        return loss_fn(full_params(p, ctx), mb, r, ctx)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)
    if micro_batches == 1:
        (_, metrics), grads = grad_fn(params, batch, jax.random.fold_in(rng, 0))
        return grads, metrics

    mbs = split_micro_batches(batch, micro_batches)
    first = jax.tree.map(lambda x: x[0], mbs)
    _, metrics_shape = jax.eval_shape(loss_of, params, first, rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (params, metrics_shape))

    def body(carry, xs):
        i, mb = xs
        (_, m), g = grad_fn(params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), carry, (g, m)), None

    (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(micro_batches), mbs))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return grads, metrics


def with_denominators(ctx: Ctx, batch: dict, denominators_fn: Callable | None) -> Ctx:
    """ctx carrying the loss's full-batch denominators (computed before any micro-batch split)."""
    if denominators_fn is None:
        return ctx
    return ctx.replace(denominators=denominators_fn(batch, ctx))


def update_ema(ema: Any, params: Any, decay: float | dict[str, float]) -> Any:
    """ema <- decay * ema + (1 - decay) * params; per role when ``decay`` is {role: decay}."""

    def one(e, p, d):
        return jax.tree.map(lambda a, b: d * a + (1.0 - d) * b, e, p)

    if isinstance(decay, dict):
        return {name: one(ema[name], params[name], d) for name, d in decay.items()}
    return one(ema, params, decay)


def reduce_metrics(metrics: dict) -> dict:
    """{name: (sum, count)} -> {name: sum / count}."""
    return {k: s / jnp.maximum(c, 1e-9) for k, (s, c) in metrics.items()}


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    micro_batches: int = 1,
    ema_decay: float | dict[str, float] = 0.0,
    lr_schedule: optax.Schedule | dict[str, optax.Schedule] | None = None,
    denominators_fn: Callable | None = None,
    mesh: jax.sharding.Mesh | None = None,
    state_shardings: Any = None,
    batch_shardings: Any = None,
    ctx_shardings: Any = None,
) -> Callable[[TrainState, dict, jax.Array, Ctx], tuple[TrainState, dict]]:
    """Jitted ``train_step(state, batch, rng, ctx) -> (state, metrics)``; the state is donated.

    A step whose loss, gradients or update are not finite (inf or NaN) is skipped: params, optimizer state
    (its own count included) and EMA stay as they were and ``metrics['skipped']`` is 1; the state's step
    still advances, since the step's batch was consumed (a resume continues from the same data position).

    With a mesh, the state/batch/ctx shardings are the explicit in/out shardings of the one compiled step
    (rng and metrics are replicated). With several trained roles (params keyed by role) ``ema_decay`` and
    ``lr_schedule`` may be dicts by role; grad and update norms are then logged per role too.
    """

    def train_step(state: TrainState, batch: dict, rng: jax.Array, ctx: Ctx):
        rng = jax.random.fold_in(rng, state.step)
        ctx = with_denominators(ctx, batch, denominators_fn)
        grads, metrics = grads_and_metrics(loss_fn, state.params, batch, rng, ctx, micro_batches)
        count = jnp.maximum(metrics["loss"][1], 1e-9)
        grads = jax.tree.map(lambda g: g / count.astype(g.dtype), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = update_ema(ema, params, ema_decay)
        grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
        finite = jnp.isfinite(metrics["loss"][0]) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
        params, opt_state, ema = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old),
            (params, opt_state, ema),
            (state.params, state.opt_state, state.ema_params),
        )
        out = reduce_metrics(metrics)
        out.update(
            grad_norm=grad_norm,
            param_norm=optax.tree.norm(params),
            update_norm=update_norm,
            tokens=metrics["loss"][1],
            skipped=1.0 - finite.astype(jnp.float32),
        )
        if isinstance(lr_schedule, dict):  # several roles: params keyed by role
            for name, schedule in lr_schedule.items():
                out[f"lr/{name}"] = schedule(state.step)
                out[f"grad_norm/{name}"] = optax.tree.norm(grads[name])
                out[f"update_norm/{name}"] = optax.tree.norm(updates[name])
        elif lr_schedule is not None:
            out["lr"] = lr_schedule(state.step)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)
        return new_state, out

    if mesh is None:
        return jax.jit(train_step, donate_argnums=0)
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_shardings, replicated, ctx_shardings),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def make_eval_step(
    loss_fn: LossFn, denominators_fn: Callable | None = None
) -> Callable[[Any, dict, jax.Array, Ctx], dict]:
    """Jitted ``eval_step(params, batch, rng, ctx) -> {name: (sum, count)}``: add over batches, reduce."""

    def eval_step(params, batch, rng, ctx):
        ctx = with_denominators(ctx, batch, denominators_fn)
        _, metrics = loss_fn(full_params(params, ctx), batch, rng, ctx)
        return metrics

    return jax.jit(eval_step)
