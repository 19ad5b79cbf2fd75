"""The building blocks of gptjax.model's decoder: parameters with logical axes, LoRA adapters, norms,
rotary embeddings, attention, MLP and the pre-norm block. gptjax.model assembles them and owns the config.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.model import attention as attn_lib
from gptjax.model.config import LORA_TARGETS, ModelConfig  # noqa: F401 (LORA_TARGETS: re-exported)


def make_param(rngs: nnx.Rngs, shape, axes, std: float | None, dtype) -> nnx.Param:
    if std is None:
        value = jnp.zeros(shape, dtype)
    elif std == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape)).astype(dtype)
    return nnx.Param(value, axes=axes)


def _add_lora(module, cfg: ModelConfig, rngs: nnx.Rngs, name: str, in_axes: tuple, out_axes: tuple):
    """Adapter pair next to weight ``name`` when it is a LoRA target: A [in..., R] normal, B [R, out...] zero.

    B starts at zero so a fresh adapter leaves the model unchanged; A is fan-in scaled so x @ A is O(1).
    """
    if cfg.lora_rank == 0 or name not in cfg.lora_targets:
        return
    pd, R = jnp.dtype(cfg.param_dtype), cfg.lora_rank
    shape = {
        "embed": cfg.d_model,
        "heads": cfg.n_heads,
        "kv_heads": cfg.kv_heads,
        "head_dim": cfg.dim_head,
        "mlp": cfg.dim_ff,
    }
    in_shape, out_shape = tuple(shape[a] for a in in_axes), tuple(shape[a] for a in out_axes)
    fan_in = math.prod(in_shape)
    a = make_param(rngs, (*in_shape, R), (*in_axes, "lora_rank"), fan_in**-0.5, pd)
    setattr(module, f"{name}_lora_a", a)
    setattr(module, f"{name}_lora_b", make_param(rngs, (R, *out_shape), ("lora_rank", *out_axes), None, pd))


def _lora_delta(module, name: str, x: jax.Array, n_in: int, key: jax.Array | None) -> jax.Array | None:
    """(dropout(x) @ A) @ B * alpha / r for weight ``name``; x's last ``n_in`` dims are its inputs."""
    cfg = module.cfg
    if cfg.lora_rank == 0 or name not in cfg.lora_targets:
        return None
    dt = x.dtype
    if key is not None and cfg.lora_dropout > 0.0:
        keep = jax.random.bernoulli(
            jax.random.fold_in(key, LORA_TARGETS.index(name)), 1.0 - cfg.lora_dropout, x.shape
        )
        x = jnp.where(keep, x / (1.0 - cfg.lora_dropout), 0).astype(dt)
    a = getattr(module, f"{name}_lora_a")[...].astype(dt)
    b = getattr(module, f"{name}_lora_b")[...].astype(dt)
    return jnp.tensordot(jnp.tensordot(x, a, axes=n_in), b, axes=1) * jnp.asarray(
        cfg.lora_alpha / cfg.lora_rank, dt
    )


def _plus(y: jax.Array, delta: jax.Array | None) -> jax.Array:
    return y if delta is None else y + delta


def dense(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
    """Contract x's last ``n_in`` dims with w's first: [..., in...], [in..., out...] -> [..., out...].

    On CPU both sides are flattened to one 2-D product first: XLA's CPU backend then needs fewer transposed
    copies of the activations for the weight gradients (the tiny LLaMA's train step, B8 x L256: 560 -> 460
    ms). On accelerators the contraction stays one einsum (no reshape across differently sharded dims).
    """
    if jax.default_backend() != "cpu":
        return jnp.tensordot(x, w, axes=n_in)
    lead, ins, outs = x.shape[: x.ndim - n_in], w.shape[:n_in], w.shape[n_in:]
    y = x.reshape(-1, math.prod(ins)) @ w.reshape(math.prod(ins), -1)
    return y.reshape(*lead, *outs)


class Norm(nnx.Module):
    """LayerNorm or RMSNorm over the last axis (``dim`` wide: d_model, or head_dim for q / k norms); with
    ``norm_plus_one`` (Gemma) the scale is 1 + w, w starting at 0."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dim: int | None = None, axis: str = "embed"):
        self.cfg = cfg
        pd, dim = jnp.dtype(cfg.param_dtype), dim or cfg.d_model
        self.scale = make_param(rngs, (dim,), (axis,), None if cfg.norm_plus_one else "ones", pd)
        if cfg.norm == "layernorm":
            self.bias = make_param(rngs, (dim,), (axis,), None, pd)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        x = x_BLD.astype(jnp.float32)
        if self.cfg.norm == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.cfg.norm_eps)
        scale = self.scale[...].astype(jnp.float32)
        x = x * (1.0 + scale if self.cfg.norm_plus_one else scale)
        if self.cfg.norm == "layernorm":
            x = x + self.bias[...].astype(jnp.float32)
        return x.astype(x_BLD.dtype)


def layer_local(cfg: ModelConfig, layer) -> bool | jax.Array:
    """Whether layer ``layer`` attends through the sliding window: a Python bool when every layer agrees or
    the index is static (unrolled layers), a traced bool for a traced index (scanned mixed layers)."""
    flags = cfg.local_layers
    if all(flags) or not any(flags):
        return flags[0]
    if isinstance(layer, int):
        return flags[layer]
    return jnp.asarray(flags)[layer]


# A window no sequence reaches: a traced global layer's "window" (one compiled body for every layer).
UNBOUNDED = 2**30


def layer_window(cfg: ModelConfig, local: bool | jax.Array) -> int | jax.Array | None:
    """The attention window of a layer (``layer_local``'s answer): None (global), an int, or traced."""
    if isinstance(local, bool):
        return cfg.sliding_window if local else None
    return jnp.where(local, cfg.sliding_window, UNBOUNDED)


def rope_inv_freq(cfg: ModelConfig, local: bool | jax.Array = False) -> jax.Array:
    """Rotary inverse frequencies [head_dim // 2], with the config's long-context scaling; a local layer
    with its own base (``rope_local_theta``, Gemma 3) gets plain frequencies of that base."""
    D = cfg.dim_head
    if cfg.rope_local_theta and local is not False:
        own = 1.0 / (cfg.rope_local_theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
        return own if local is True else jnp.where(local, own, rope_inv_freq(cfg))
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
    if cfg.rope_scaling == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_scaling == "llama3":  # slow rotations stretched by factor, fast ones kept, a ramp between
        wavelen = 2 * jnp.pi / inv_freq
        ramp = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        ramp = jnp.clip(ramp, 0.0, 1.0)
        return (1 - ramp) * inv_freq / cfg.rope_factor + ramp * inv_freq
    return inv_freq


def rope(
    x_BLHD: jax.Array, positions_BL: jax.Array, theta: float, inv_freq: jax.Array | None = None
) -> jax.Array:
    """Rotary embedding, rotate-half layout (the Hugging Face LLaMA convention)."""
    D = x_BLHD.shape[-1]
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (jnp.arange(0, D, 2, dtype=jnp.float32) / D))
    angles_BLd = positions_BL[..., None].astype(jnp.float32) * inv_freq
    cos_BL1D = jnp.cos(jnp.concatenate([angles_BLd, angles_BLd], -1))[:, :, None, :]
    sin_BL1D = jnp.sin(jnp.concatenate([angles_BLd, angles_BLd], -1))[:, :, None, :]
    x = x_BLHD.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * cos_BL1D + rotated * sin_BL1D).astype(x_BLHD.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, H, K, E = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.dim_head
        pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        out_std = std / (2 * cfg.n_layers) ** 0.5  # GPT-2: residual projections scaled by depth
        self.wq = make_param(rngs, (D, H, E), ("embed", "heads", "head_dim"), std, pd)
        self.wk = make_param(rngs, (D, K, E), ("embed", "kv_heads", "head_dim"), std, pd)
        self.wv = make_param(rngs, (D, K, E), ("embed", "kv_heads", "head_dim"), std, pd)
        self.wo = make_param(rngs, (H, E, D), ("heads", "head_dim", "embed"), out_std, pd)
        if cfg.qkv_bias:
            self.bq = make_param(rngs, (H, E), ("heads", "head_dim"), None, pd)
            self.bk = make_param(rngs, (K, E), ("kv_heads", "head_dim"), None, pd)
            self.bv = make_param(rngs, (K, E), ("kv_heads", "head_dim"), None, pd)
        if cfg.out_bias:
            self.bo = make_param(rngs, (D,), ("embed",), None, pd)
        if cfg.qk_norm:
            self.q_norm = Norm(cfg, rngs, E, "head_dim")
            self.k_norm = Norm(cfg, rngs, E, "head_dim")
        _add_lora(self, cfg, rngs, "wq", ("embed",), ("heads", "head_dim"))
        _add_lora(self, cfg, rngs, "wk", ("embed",), ("kv_heads", "head_dim"))
        _add_lora(self, cfg, rngs, "wv", ("embed",), ("kv_heads", "head_dim"))
        _add_lora(self, cfg, rngs, "wo", ("heads", "head_dim"), ("embed",))

    def _proj(self, x_BLD, w, b, name=None, lora_key=None):
        dt = x_BLD.dtype
        y = dense(x_BLD, w[...].astype(dt))
        y = _plus(y, _lora_delta(self, name, x_BLD, 1, lora_key))
        return y if b is None else y + b[...].astype(dt)

    def qkv(self, x_BLD, positions_BL, lora_key=None, local: bool | jax.Array = False):
        """q, k, v of the normed input; ``local``: the layer is a sliding-window one (its rope base)."""
        cfg = self.cfg
        q_BLHD = self._proj(x_BLD, self.wq, getattr(self, "bq", None), "wq", lora_key)
        k_BLKD = self._proj(x_BLD, self.wk, getattr(self, "bk", None), "wk", lora_key)
        v_BLKD = self._proj(x_BLD, self.wv, getattr(self, "bv", None), "wv", lora_key)
        if cfg.qk_norm:
            q_BLHD, k_BLKD = self.q_norm(q_BLHD), self.k_norm(k_BLKD)
        if cfg.pos == "rope":
            inv_freq = rope_inv_freq(cfg, local)
            q_BLHD = rope(q_BLHD, positions_BL, cfg.rope_theta, inv_freq)
            k_BLKD = rope(k_BLKD, positions_BL, cfg.rope_theta, inv_freq)
        return q_BLHD, k_BLKD, v_BLKD

    def out(self, o_BLHD, lora_key=None):
        dt = o_BLHD.dtype
        y_BLD = dense(o_BLHD, self.wo[...].astype(dt), 2)
        y_BLD = _plus(y_BLD, _lora_delta(self, "wo", o_BLHD, 2, lora_key))
        return y_BLD + self.bo[...].astype(dt) if self.cfg.out_bias else y_BLD


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        D, F = cfg.d_model, cfg.dim_ff
        pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        self.w_in = make_param(rngs, (D, F), ("embed", "mlp"), std, pd)
        if cfg.gated:
            self.w_gate = make_param(rngs, (D, F), ("embed", "mlp"), std, pd)
        self.w_out = make_param(rngs, (F, D), ("mlp", "embed"), std / (2 * cfg.n_layers) ** 0.5, pd)
        if cfg.mlp_bias:
            self.b_in = make_param(rngs, (F,), ("mlp",), None, pd)
            self.b_out = make_param(rngs, (D,), ("embed",), None, pd)
        _add_lora(self, cfg, rngs, "w_in", ("embed",), ("mlp",))
        if cfg.gated:
            _add_lora(self, cfg, rngs, "w_gate", ("embed",), ("mlp",))
        _add_lora(self, cfg, rngs, "w_out", ("mlp",), ("embed",))

    def __call__(self, x_BLD, lora_key=None):
        cfg, dt = self.cfg, x_BLD.dtype
        h_BLF = _plus(dense(x_BLD, self.w_in[...].astype(dt)), _lora_delta(self, "w_in", x_BLD, 1, lora_key))
        if cfg.mlp_bias:
            h_BLF = h_BLF + self.b_in[...].astype(dt)
        if cfg.gated:
            gate_BLF = dense(x_BLD, self.w_gate[...].astype(dt))
            gate_BLF = _plus(gate_BLF, _lora_delta(self, "w_gate", x_BLD, 1, lora_key))
            act = jax.nn.silu if cfg.mlp == "swiglu" else functools.partial(jax.nn.gelu, approximate=True)
            h_BLF = act(gate_BLF) * h_BLF
        elif cfg.mlp == "relu":
            h_BLF = jax.nn.relu(h_BLF)
        else:
            h_BLF = jax.nn.gelu(h_BLF, approximate=cfg.mlp == "gelu")
        y_BLD = dense(h_BLF, self.w_out[...].astype(dt))
        y_BLD = _plus(y_BLD, _lora_delta(self, "w_out", h_BLF, 1, lora_key))
        return y_BLD + self.b_out[...].astype(dt) if cfg.mlp_bias else y_BLD


class Block(nnx.Module):
    """Pre-norm transformer block; with ``post_norms`` (Gemma) the attention and MLP outputs are normed too
    before their residual adds."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        if cfg.post_norms:
            self.attn_post_norm = Norm(cfg, rngs)
            self.mlp_post_norm = Norm(cfg, rngs)

    def _attn_kw(self, local) -> dict:
        cfg = self.cfg
        return dict(
            impl=cfg.attention_impl,
            softmax_scale=cfg.softmax_scale,
            window=layer_window(cfg, local),
            softcap=cfg.attn_softcap,
        )

    def _residual(self, x_BLD, o_BLHD, lora_key):
        """The attention output added to the residual stream, then the MLP's."""
        y_BLD = self.attn.out(o_BLHD, lora_key)
        x_BLD = x_BLD + (self.attn_post_norm(y_BLD) if self.cfg.post_norms else y_BLD)
        y_BLD = self.mlp(self.mlp_norm(x_BLD), lora_key)
        return x_BLD + (self.mlp_post_norm(y_BLD) if self.cfg.post_norms else y_BLD)

    def __call__(self, x_BLD, positions_BL, segment_ids_BL, lora_key=None, layer=0):
        """``layer``: this block's index (an int, or traced under scan), which picks local or global
        attention."""
        local = layer_local(self.cfg, layer)
        q, k, v = self.attn.qkv(self.attn_norm(x_BLD), positions_BL, lora_key, local)
        o_BLHD = attn_lib.attention(
            q, k, v, causal=True, segment_ids_BL=segment_ids_BL, **self._attn_kw(local)
        )
        return self._residual(x_BLD, o_BLHD, lora_key)

    def decode(self, x_BLD, positions_BL, k_cache, v_cache, layer, prefill: bool = False):
        """Write this chunk's K/V into cache layer ``layer`` at slots ``positions_BL`` and attend to that
        layer's cache up to each slot (within the window on a local layer). The caches (keys [B, K, D, S],
        values [B, K, S, D] of ``gptjax.model.init_cache``, stacked [N, ...] or a tuple of N) take the new
        keys and values in one scatter each, in place. A local layer's cache keeps every slot
        too (no rolling buffer): its attention skips the slots behind the window.

        ``prefill``: the chunk fills slots 0..L-1 of an empty cache, so attending to the cache up to each
        slot is causal self-attention over the chunk: the training attention (fused kernels on
        accelerators), with no [B, H, L, S] scores against the whole cache.
        """
        local = layer_local(self.cfg, layer)
        q, k, v = self.attn.qkv(self.attn_norm(x_BLD), positions_BL, local=local)
        k_cache, k_BKDS = _cache_write(k_cache, layer, positions_BL, k, slot_axis=3)
        v_cache, v_BKSD = _cache_write(v_cache, layer, positions_BL, v, slot_axis=2)
        if prefill:
            o_BLHD = attn_lib.attention(q, k, v, causal=True, **self._attn_kw(local))
        else:
            o_BLHD = attn_lib.cached_attention(q, k_BKDS, v_BKSD, positions_BL, **self._attn_kw(local))
        return self._residual(x_BLD, o_BLHD, None), k_cache, v_cache


def _cache_write(cache, layer, positions_BL, new_BLKD, slot_axis: int):
    """(cache with layer ``layer`` written at each row's slots, that layer's cache).

    A layer's cache is keys [B, K, D, S] (``slot_axis`` 3) or values [B, K, S, D] (``slot_axis`` 2). Rows
    and slots are indexed with full slices between them, and NumPy indexing then puts the indexed axes first:
    the written view is [B, L, K, D], the new entries' own layout, for both.
    """
    rows_B1 = jnp.arange(new_BLKD.shape[0])[:, None]
    at = (rows_B1, *(slice(None),) * (slot_axis - 1), positions_BL)
    if isinstance(cache, tuple):  # one buffer per layer: nothing to slice out for the attention
        layer_cache = cache[layer].at[at].set(new_BLKD.astype(cache[layer].dtype))
        return (*cache[:layer], layer_cache, *cache[layer + 1 :]), layer_cache
    cache = cache.at[(layer, *at)].set(new_BLKD.astype(cache.dtype))
    return cache, cache[layer]
