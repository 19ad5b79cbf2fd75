"""GPT decoder in Flax NNX: the GPT-2, OPT, LLaMA (Mistral, Qwen2), Qwen3 and Gemma 2 / 3 families, LM head
or scalar head, KV-cache decode path.

Outside this module a model is a config plus a params pytree (a nested dict of arrays):

    params = init(cfg, rng, mesh=None)
    logits_BLV = apply(cfg, params, tokens_BL)          # scalar head: values_BL

Layers are stacked on a leading 'layers' axis and run with ``jax.lax.scan`` (one compiled layer body) or,
with ``scan_layers=False`` (the CPU default), as an unrolled loop over the same stacked params.
Every parameter carries logical axis names (``logical_axes(cfg)``); ``gptjax.model.sharding`` maps them to
the mesh.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from flax import nnx

from gptjax.model import qleaf, sharding
from gptjax.model.config import ModelConfig
from gptjax.model.layers import Block, Norm, make_param

Params = dict[str, Any]


def num_params(cfg: ModelConfig, embeddings: bool = True) -> int:
    shapes = jax.tree.leaves(param_shapes(cfg))
    total = sum(math.prod(s.shape) for s in shapes)  # Python ints: a stacked 13B layer overflows int32
    if not embeddings:
        total -= cfg.vocab_size * cfg.d_model + (cfg.max_len * cfg.d_model if cfg.pos == "learned" else 0)
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward): 6N plus causal attention scores.

    N counts non-embedding matmul params and the LM head; attention adds 2 matmuls of L*D per layer,
    halved for causal masking, times 3 for the backward pass.
    """
    n = num_params(cfg, embeddings=False)
    if cfg.head == "lm":
        n += cfg.vocab_size * cfg.d_model
    keys = sum(_mean_keys(seq_len, cfg.sliding_window if local else 0) for local in cfg.local_layers)
    attn = 2 * 2 * cfg.n_heads * cfg.dim_head * keys
    return 6.0 * n + 3.0 * attn


def _mean_keys(seq_len: int, window: int) -> float:
    """Keys a query reads on average: half the sequence (causal), or about the window when it is shorter."""
    if not window or window >= seq_len:
        return seq_len / 2
    return window - window * (window - 1) / (2 * seq_len)


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pd, std = jnp.dtype(cfg.param_dtype), cfg.init_std
        self.embed = make_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), std, pd)
        if cfg.pos == "learned":
            self.pos_embed = make_param(rngs, (cfg.max_len, cfg.d_model), ("pos", "embed"), std / 2, pd)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = Norm(cfg, rngs)
        if cfg.head == "lm" and not cfg.tie_embeddings:
            self.lm_head = make_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std, pd)
        if cfg.head == "scalar":
            head_std = None if cfg.scalar_head_init == "zero" else 1.0 / (cfg.d_model + 1) ** 0.5
            self.value_head = make_param(rngs, (cfg.d_model,), ("embed",), head_std, pd)
            self.value_bias = make_param(rngs, (), (), None, pd)

    def embed_tokens(self, tokens_BL, positions_BL):
        dt = jnp.dtype(self.cfg.dtype)
        x_BLD = jnp.take(self.embed[...], tokens_BL, axis=0)
        if self.cfg.embed_scale:  # in the table's dtype, as Gemma scales them
            x_BLD = x_BLD * jnp.asarray(self.cfg.d_model**0.5, x_BLD.dtype)
        x_BLD = x_BLD.astype(dt)
        if self.cfg.pos == "learned":
            x_BLD = x_BLD + jnp.take(self.pos_embed[...], positions_BL, axis=0).astype(dt)
        return x_BLD

    def head_out(self, x_BLD):
        cfg = self.cfg
        x_BLD = self.final_norm(x_BLD)
        if cfg.head == "scalar":
            w_D = self.value_head[...].astype(jnp.float32)
            return x_BLD.astype(jnp.float32) @ w_D + self.value_bias[...].astype(jnp.float32)
        w_DV = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        logits = jnp.einsum(
            "bld,dv->blv", x_BLD, w_DV.astype(x_BLD.dtype), preferred_element_type=jnp.float32
        )
        return cap_logits(cfg, logits)

    def __call__(
        self, tokens_BL, positions_BL, segment_ids_BL, return_hidden=False, dropout_rng=None, head=True
    ):
        x_BLD = sharding.batch_sharded(self.embed_tokens(tokens_BL, positions_BL))
        graphdef, stacked = nnx.split(self.blocks)
        quantized = qleaf.has_quantized(stacked)  # a quantised frozen base: static structure
        use_dropout = dropout_rng is not None and self.cfg.lora_rank > 0 and self.cfg.lora_dropout > 0
        keys_N = jax.random.split(dropout_rng, self.cfg.n_layers) if use_dropout else None

        def body(x_BLD, xs, layer):
            layer_params, key = xs
            block = nnx.merge(graphdef, _dense_layer(self.cfg, layer_params, quantized))
            return block(x_BLD, positions_BL, segment_ids_BL, key, layer), None

        def run(x_BLD, xs, layer):  # the layer index closed over: static where the layers are unrolled
            return _remat(lambda x, p: body(x, p, layer), self.cfg.remat, quantized)(x_BLD, xs)

        x_BLD, _ = over_layers(self.cfg, run, x_BLD, (stacked, keys_N))
        out = self.head_out(x_BLD) if head else self.final_norm(x_BLD)
        return (out, x_BLD) if return_hidden else out

    def decode(self, tokens_BL, positions_BL, cache, logits_at_B=None, layers=None, prefill=False):
        """``layers``: per-layer block states (``unstack_layers``) to use instead of slicing self.blocks;
        ``prefill``: see the function ``decode``."""
        x_BLD = self.embed_tokens(tokens_BL, positions_BL)
        graphdef, stacked = nnx.split(self.blocks)
        quantized = qleaf.has_quantized(stacked if layers is None else layers)

        # The whole cache rides in the carry and each layer writes its own slots in place; as scanned xs/ys
        # it would be sliced out and stacked back (a copy of the cache per token).
        def body(carry, layer_params, layer):
            x_BLD, k_cache, v_cache = carry
            return nnx.merge(graphdef, _dense_layer(self.cfg, layer_params, quantized)).decode(
                x_BLD, positions_BL, k_cache, v_cache, layer, prefill
            ), None

        (x_BLD, k_cache, v_cache), _ = over_layers(
            self.cfg,
            body,
            (x_BLD, cache["k"], cache["v"]),
            stacked if layers is None else layers,
            unstacked=layers is not None,
        )
        if logits_at_B is not None:  # project one position per row: a prefill never builds [B, P, V]
            x_BLD = jnp.take_along_axis(x_BLD, logits_at_B[:, None, None], axis=1)
        return self.head_out(x_BLD), {"k": k_cache, "v": v_cache}


def over_layers(cfg: ModelConfig, body, carry, xs, unstacked: bool = False):
    """``jax.lax.scan`` of ``body(carry, layer_xs, layer) -> (carry, y)`` over the layers axis of ``xs``, or
    the same loop unrolled (``cfg.scan``); ``layer`` is the layer index (a static int when unrolled).
    ``unstacked`` (unrolled only): xs is already a tuple of per-layer trees.
    """
    if cfg.scan:
        if unstacked:
            raise ValueError("per-layer (unstacked) params need scan_layers=False")
        return jax.lax.scan(lambda c, x: body(c, *x), carry, (xs, jnp.arange(cfg.n_layers)))
    ys = []
    for i in range(cfg.n_layers):
        layer_xs = xs[i] if unstacked else jax.tree.map(lambda a, i=i: a[i], xs)
        carry, y = body(carry, layer_xs, i)
        ys.append(y)
    if jax.tree.leaves(ys[0]):
        return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
    return carry, None


def _dense_layer(cfg: ModelConfig, layer_params, quantized: bool):
    """A layer's params as ``nnx.merge`` takes them: as they are, or with a quantised base's weights
    dequantised in the compute dtype, one layer at a time inside the layer loop."""
    if not quantized:
        return layer_params
    pure = nnx.to_pure_dict(layer_params) if isinstance(layer_params, nnx.State) else layer_params
    return qleaf.dense_layer(pure, param_shapes(cfg)["blocks"], cfg.dtype)


def _remat(fn, policy: str, quantized: bool = False):
    if policy == "none" and quantized:
        # Saving everything would keep a quantised base's dequantised weights for the backward pass (under
        # scan: every layer's, a dense base). No matmul outputs them, so 'dots' recomputes them per layer.
        policy = "dots"
    if policy == "none":
        return fn
    cp = jax.checkpoint_policies
    policies = {
        "full": cp.nothing_saveable,
        "dots": cp.checkpoint_dots,
        "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
    }
    chosen = policies[policy]
    if policy != "full":  # and the fused attention's output and log-sum-exp: no second forward kernel
        # Pallas: imported only when a remat policy keeps the kernel's outputs
        from gptjax.kernels import flash_attention

        chosen = cp.save_from_both_policies(chosen, flash_attention.save_forward_kernel)
    return jax.checkpoint(fn, policy=chosen, prevent_cse=False)


# ----------------------------------------------------------------------------------------------------
# Pure functional API


@functools.lru_cache(maxsize=64)
def _abstract(cfg: ModelConfig):
    model = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)))
    return nnx.split(model)


def param_shapes(cfg: ModelConfig) -> Params:
    """Params pytree of jax.ShapeDtypeStruct, without allocating anything."""
    return nnx.to_pure_dict(_abstract(cfg)[1])


def logical_axes(cfg: ModelConfig) -> Params:
    """Params-shaped pytree of logical axis-name tuples; stacked layer params lead with 'layers'."""
    state = _abstract(cfg)[1]
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731

    def axes_of(path, var):
        axes = tuple(var.get_metadata()["axes"])
        return ("layers", *axes) if path[0] == "blocks" else axes

    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_var)[0]
    out: Params = {}
    for path, var in flat:
        keys = [getattr(p, "key", getattr(p, "name", None)) for p in path]
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = axes_of(keys, var)
    return out


@functools.lru_cache(maxsize=32)
def _init_fn(cfg: ModelConfig, mesh: jax.sharding.Mesh | None):
    def make(rng):
        return nnx.to_pure_dict(nnx.state(GPT(cfg, nnx.Rngs(params=rng))))

    if mesh is None:
        return jax.jit(make)
    return jax.jit(make, out_shardings=param_shardings(cfg, mesh))


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh) -> Params:
    """Params-shaped pytree of NamedSharding: the logical axes mapped by ``gptjax.model.sharding``'s one
    table."""
    return sharding.shardings_for(logical_axes(cfg), param_shapes(cfg), mesh)


def init(cfg: ModelConfig, rng: jax.Array, mesh: jax.sharding.Mesh | None = None) -> Params:
    """Random params; with a mesh, every array is created directly in its sharded layout."""
    return _init_fn(cfg, mesh)(rng)


def positions_from_segments(segment_ids_BL: jax.Array) -> jax.Array:
    """Positions that restart at 0 at each new segment (packed sequences)."""
    L = segment_ids_BL.shape[1]
    idx_BL = jnp.broadcast_to(jnp.arange(L), segment_ids_BL.shape)
    starts_BL = jnp.concatenate(
        [jnp.ones_like(segment_ids_BL[:, :1], bool), segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], 1
    )
    start_idx_BL = jax.lax.cummax(jnp.where(starts_BL, idx_BL, 0), axis=1)
    return idx_BL - start_idx_BL


def apply(
    cfg: ModelConfig,
    params: Params,
    tokens_BL: jax.Array,
    positions_BL: jax.Array | None = None,
    segment_ids_BL: jax.Array | None = None,
    *,
    return_hidden: bool = False,
    dropout_rng: jax.Array | None = None,
    head: bool = True,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Forward pass: logits_BLV (fp32) for LM heads, values_BL (fp32) for scalar heads.

    ``segment_ids_BL`` (0 = padding) keeps packed documents from attending to each other; positions default
    to 0.. per segment. ``return_hidden`` also returns the final pre-norm hidden states hidden_BLD.
    ``dropout_rng`` turns on LoRA dropout (cfg.lora_dropout); None = deterministic. ``head=False`` returns
    the final-normed hidden states features_BLD instead of the head's output: with ``lm_head_weight`` they
    give the logits chunk by chunk (``gptjax.losses.vocab``), never [B, L, V] at once.
    """
    if positions_BL is None:
        positions_BL = (
            jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
            if segment_ids_BL is None
            else positions_from_segments(segment_ids_BL)
        )
    model = nnx.merge(_abstract(cfg)[0], params)
    return model(
        tokens_BL,
        positions_BL,
        segment_ids_BL,
        return_hidden=return_hidden,
        dropout_rng=dropout_rng,
        head=head,
    )


def cap_logits(cfg: ModelConfig, logits: jax.Array) -> jax.Array:
    """The final soft-cap c * tanh(logits / c) (Gemma 2's final_softcap; the logits as they are when 0)."""
    if not cfg.final_softcap:
        return logits
    return cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)


def lm_head_weight(cfg: ModelConfig, params: Params, capped: bool = False) -> jax.Array:
    """The LM head's [D, V] matrix (the embedding, transposed, when tied): logits = features @ it, then
    ``cap_logits`` for a model with a final soft-cap (Gemma 2). ``capped``: the caller applies it (without,
    such a model's caller is warned once per trace that its logits lack the cap)."""
    if cfg.head != "lm":
        raise ValueError(f"lm_head_weight: this model has head={cfg.head!r}, not an LM head")
    if cfg.final_softcap and not capped:
        logging.warning(
            "lm_head_weight: family=%r caps its logits (final_softcap=%s) and this caller does not apply "
            "model.cap_logits: its logits differ from model.apply's",
            cfg.family,
            cfg.final_softcap,
        )
    return params["embed"].T if cfg.tie_embeddings else params["lm_head"]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict[str, Any]:
    """Empty KV cache: keys [N, B, K, D, S] and values [N, B, K, S, D]; with unrolled layers (``cfg.scan``
    False) tuples of N per-layer arrays instead, so a layer's attention reads its own buffer rather than a
    slice copy. Kv-head major, keys transposed: a decode step's two products, q @ keys and p @ values, read
    each (row, kv head)'s slab in place as plain [D, S] and [S, D] matrices (CPU products, GPU kernel blocks).
    """
    B, K, S, D = batch, cfg.kv_heads, max_len, cfg.dim_head
    dt = jnp.dtype(dtype or cfg.dtype)
    shapes = {"k": (B, K, D, S), "v": (B, K, S, D)}
    if cfg.scan:
        return {name: jnp.zeros((cfg.n_layers, *shape), dt) for name, shape in shapes.items()}
    return {name: tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers)) for name, shape in shapes.items()}


def decode(
    cfg: ModelConfig,
    params: Params,
    tokens_BL: jax.Array,
    positions_BL: jax.Array,
    cache: dict,
    logits_at_B: jax.Array | None = None,
    prefill: bool = False,
) -> tuple[jax.Array, dict]:
    """Run tokens at cache slots ``positions_BL`` (prefill: a whole prompt; decode: one token per row).

    ``params`` may come from ``unstack_layers`` (what a decode loop should pass when layers are unrolled).

    Positions are both the rotary/learned positions and the cache slots, so rows of a batch may sit at
    different lengths (right-padded prompts). Returns (logits_BLV or values_BL, updated cache); with
    ``logits_at_B`` only the output at that index of each row is computed (shape [B, 1, ...]).

    ``prefill=True`` (a static switch) promises that the tokens sit at slots 0..L-1 of an empty cache
    (``positions_BL`` = arange(L) in every row, as a right-padded prompt's are): the attention then runs as in
    training (causal over the chunk; the fused kernels on accelerators) instead of against all S slots.
    """
    layers = params["blocks"] if isinstance(params["blocks"], tuple) else None
    if layers is not None:  # merge needs the blocks' tree structure (not their shapes): any layer has it
        params = {**params, "blocks": layers[0]}
    model = nnx.merge(_abstract(cfg)[0], params)
    return model.decode(tokens_BL, positions_BL, cache, logits_at_B, layers, prefill)


def unstack_layers(cfg: ModelConfig, params: Params) -> Params:
    """Params for ``decode`` with the stacked layers split into a tuple of per-layer trees (unrolled layers).

    A decode loop calls the model once per token; slicing each layer's weights out of the stacked arrays
    inside the loop copies all of them every token (XLA:CPU does not hoist the slices), so generation
    slices once before its loop. Scanned layers read their slices in place and keep the stacked params.
    """
    if cfg.scan:
        return params
    blocks = params["blocks"]
    return {**params, "blocks": tuple(jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(cfg.n_layers))}
