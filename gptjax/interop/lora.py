"""LoRA adapters as pure functions over a params pytree.

The adapters live inside the model: ``ModelConfig.lora_rank > 0`` gives every targeted projection ``W`` a pair
``W_lora_a`` [in..., R] and ``W_lora_b`` [R, out...], and the forward pass adds ``(x @ A) @ B * alpha / r``.

    adapters, base = split(params)          # train `adapters`, hold `base` frozen, save only `adapters`
    params = combine(adapters, base)
    cfg0, params0 = merge(cfg, params)      # fold adapters into W: a plain model again (e.g. for hf.save)
    params = add_adapters(cfg, params0, rng)  # fresh adapters on loaded base weights (HF, earlier stage)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from gptjax import model
from gptjax.model import quant

Params = dict[str, Any]
_SUFFIXES = ("_lora_a", "_lora_b")


def _key_name(k: Any) -> str:
    return str(getattr(k, "key", getattr(k, "name", k)))


def is_adapter(path: Any) -> bool:
    """True for the path of an adapter leaf (a tuple of keys or jax key-path entries)."""
    path = (path,) if isinstance(path, str) else tuple(path)
    return bool(path) and _key_name(path[-1]).endswith(_SUFFIXES)


def adapter_mask(params: Params) -> Any:
    """Params-shaped pytree of bools, True on adapters (e.g. for ``optax.masked``)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: is_adapter(path), params)


def _partition(tree: Params, first: bool, also: tuple[str, ...], path: tuple = ()) -> Params:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = _partition(v, first, also, (*path, k))
            if sub:
                out[k] = sub
        elif (is_adapter((*path, k)) or any(str(p) in also for p in (*path, k))) == first:
            out[k] = v
    return out


def split(params: Params, also: tuple[str, ...] = ()) -> tuple[Params, Params]:
    """(adapters, base): two disjoint nested dicts; together they hold every leaf of ``params``.

    ``also`` names params that train with the adapters (any key on their path), e.g. a reward model's
    fresh ``("value_head", "value_bias")``.
    """
    return _partition(params, True, tuple(also)), _partition(params, False, tuple(also))


def combine(adapters: Params, base: Params) -> Params:
    """Inverse of ``split``: a nested union of the two trees (a key present in both must be a subtree)."""
    out = dict(base)
    for k, v in adapters.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = combine(v, out[k])
        else:
            raise ValueError(f"lora.combine: key {k!r} is a leaf in both adapters and base")
    return out


def _fold(w: jax.Array, a: jax.Array, b: jax.Array, scale: float, stacked: bool) -> jax.Array:
    """W + A @ B * scale in fp32, cast back to W's dtype; A [N?, in..., R], B [N?, R, out...]."""
    lead = a.shape[:1] if stacked else ()
    r = a.shape[-1]
    a2 = a.reshape(*lead, -1, r).astype(jnp.float32)
    b2 = b.reshape(*lead, r, -1).astype(jnp.float32)
    delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(w.shape)
    return (w.astype(jnp.float32) + delta * scale).astype(w.dtype)


def merged_config(cfg: model.ModelConfig) -> model.ModelConfig:
    """The config of a LoRA model once ``merge`` has folded its adapters in: no adapters, and no quantised
    base to hold (the weights are what the merge made them)."""
    return cfg.replace(lora_rank=0, lora_base_quant="")


def merge(cfg: model.ModelConfig, params: Params) -> tuple[model.ModelConfig, Params]:
    """Fold every adapter into its base weight: (cfg with lora_rank=0, params without adapters).

    The merged model computes the same function as the unmerged one (dropout off), up to float rounding; a
    quantised base (``lora_base_quant``) is dequantised first.
    """
    base_cfg = merged_config(cfg)
    if quant.has_quantized(params):  # a quantised base: its weights as they compute, in the param dtype
        params = quant.dequantize_base(cfg, params)
    if cfg.lora_rank == 0:
        return base_cfg, params
    scale = cfg.lora_alpha / cfg.lora_rank

    def walk(tree: Params, path: tuple) -> Params:
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out[k] = walk(v, (*path, k))
            elif is_adapter((k,)):
                continue
            elif f"{k}_lora_a" in tree:
                out[k] = _fold(
                    v, tree[f"{k}_lora_a"], tree[f"{k}_lora_b"], scale, stacked=path[:1] == ("blocks",)
                )
            else:
                out[k] = v
        return out

    merged = walk(params, ())
    _check_structure(base_cfg, merged, "lora.merge result")
    return base_cfg, merged


def _check_structure(cfg: model.ModelConfig, params: Params, what: str) -> None:
    want = jax.tree_util.tree_flatten_with_path(model.param_shapes(cfg))[0]
    got = jax.tree_util.tree_flatten_with_path(params)[0]
    want_d = {jax.tree_util.keystr(p): tuple(s.shape) for p, s in want}
    got_d = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in got}
    if want_d != got_d:
        missing = sorted(set(want_d) - set(got_d))
        extra = sorted(set(got_d) - set(want_d))
        shapes = sorted(k for k in set(want_d) & set(got_d) if want_d[k] != got_d[k])
        raise ValueError(
            f"{what}: params do not match the model config: missing {missing}, unexpected {extra}, "
            f"wrong shape {[(k, got_d[k], want_d[k]) for k in shapes]}"
        )


def adapter_shardings(cfg: model.ModelConfig, mesh: jax.sharding.Mesh) -> Params:
    """NamedShardings of the adapters of ``cfg`` (the adapter half of ``model.param_shardings``)."""

    return split(model.param_shardings(cfg, mesh))[0]


def add_adapters(
    cfg: model.ModelConfig, params: Params, rng: jax.Array, mesh: jax.sharding.Mesh | None = None
) -> Params:
    """Attach fresh adapters (A random, B zero, as ``model.init`` makes them) to adapter-free params.

    ``params`` must match ``cfg`` without LoRA; the result matches ``cfg`` and computes the same function.
    """
    if cfg.lora_rank == 0:
        raise ValueError("lora.add_adapters: cfg.lora_rank is 0; set lora_rank (and lora_targets) first")
    if split(params)[0]:
        raise ValueError("lora.add_adapters: params already hold adapters; merge or split them first")
    _check_structure(cfg.replace(lora_rank=0), params, "lora.add_adapters")

    shapes = split(model.param_shapes(cfg))[0]
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)

    # Same rule as model.init (layers._add_lora): A ~ N(0, 1/fan_in), B = 0, so the output is unchanged.
    # One normal draw sliced into every A: each random op costs a separate, slow compile on CPU.
    def make(rng):
        is_a = [not _key_name(path[-1]).endswith("_lora_b") for path, _ in flat]
        noise = jax.random.normal(rng, (sum(s.size for (_, s), a in zip(flat, is_a, strict=True) if a),))
        out, offset = [], 0
        for (path, s), a in zip(flat, is_a, strict=True):
            if not a:
                out.append(jnp.zeros(s.shape, s.dtype))
                continue
            fan_in = math.prod(s.shape[1:-1] if _key_name(path[0]) == "blocks" else s.shape[:-1])
            out.append((noise[offset : offset + s.size].reshape(s.shape) * fan_in**-0.5).astype(s.dtype))
            offset += s.size
        return jax.tree_util.tree_unflatten(treedef, out)

    shardings = None if mesh is None else adapter_shardings(cfg, mesh)
    adapters = jax.jit(make, out_shardings=shardings)(rng)
    return combine(adapters, params)
