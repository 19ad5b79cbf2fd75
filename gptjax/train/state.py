"""Train state (step, params, optimizer state, optional EMA of params), created in its sharded layout."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None  # None when EMA is off; with params keyed by role, {role: tree} of the EMA roles


def _dict_keys(path) -> tuple:
    return tuple(p.key for p in path if isinstance(p, jax.tree_util.DictKey))


def state_shardings(abstract_state: TrainState, param_shardings: Any, mesh: Mesh) -> TrainState:
    """Shardings for a whole state: optimizer moments follow the param they belong to; scalars replicate.

    An optimizer leaf belongs to the param whose dict-key path ends its own path (optax nests the params
    tree inside its states), and must have that param's shape.
    """
    by_path = {_dict_keys(path): s for path, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
    shape_by_path = {
        _dict_keys(path): x.shape
        for path, x in jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]
    }
    replicated = NamedSharding(mesh, P())

    def for_opt_leaf(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            suffix = keys[start:]
            if suffix in by_path and shape_by_path[suffix] == leaf.shape:
                return by_path[suffix]
        return replicated

    opt = jax.tree_util.tree_map_with_path(for_opt_leaf, abstract_state.opt_state)
    ema = jax.tree_util.tree_map_with_path(for_opt_leaf, abstract_state.ema_params)  # EMA mirrors params
    return TrainState(step=replicated, params=param_shardings, opt_state=opt, ema_params=ema)


def create(
    params: Any,
    optimizer: optax.GradientTransformation,
    *,
    ema: bool | tuple[str, ...],
    param_shardings: Any = None,
    mesh: Mesh | None = None,
) -> TrainState:
    """Wrap (possibly sharded) params into a fresh TrainState; optimizer state built sharded like params.

    ``ema``: keep an EMA of the params (True), or, with params keyed by role, of the roles named.
    """

    def make(params):
        if isinstance(ema, tuple):
            ema_params = {name: jax.tree.map(jnp.copy, params[name]) for name in ema} if ema else None
        else:
            ema_params = jax.tree.map(jnp.copy, params) if ema else None
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            ema_params=ema_params,
        )

    if mesh is None:
        return jax.jit(make)(params)
    shardings = state_shardings(jax.eval_shape(make, params), param_shardings, mesh)
    return jax.jit(make, out_shardings=shardings)(params)
