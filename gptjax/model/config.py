"""The model's configuration: ``ModelConfig`` (a frozen dataclass with presets for the GPT-2, LLaMA, OPT,
Qwen3 and Gemma 2 / 3 families) and the helpers that read it without building a model."""

from __future__ import annotations

import dataclasses

import jax

from gptjax.model import attention as attn_lib

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_in", "w_gate", "w_out")  # projections that can carry adapters
LORA_BASE_QUANT = ("", "int8", "int4", "nf4")  # how a LoRA role holds its frozen base (lora_base_quant)
FAMILIES = ("gpt2", "llama", "opt", "qwen3", "gemma2", "gemma3")
MLPS = ("gelu", "gelu_exact", "relu", "swiglu", "geglu")
GATED_MLPS = ("swiglu", "geglu")  # MLPs with a gate projection (w_gate)
LAYER_TYPES = ("global", "local")

# What each layer keeps for the backward pass: none = everything (no recompute), full = nothing, dots =
# every matmul output, dots_no_batch = the weight matmuls' outputs (not attention's batched products). The
# last two also keep the fused attention kernel's output and log-sum-exp (its recompute is the costliest).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics. Use ``ModelConfig.gpt2(...)`` / ``ModelConfig.llama(...)`` presets."""

    family: str = "gpt2"  # one of FAMILIES: which HF architecture hf.save writes
    vocab_size: int = 259
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (multi-head); fewer = grouped-query attention
    head_dim: int | None = None  # None = d_model // n_heads
    d_ff: int | None = None  # None = 4 * d_model
    max_len: int = 256
    norm: str = "layernorm"  # 'layernorm' | 'rmsnorm'
    norm_eps: float = 1e-5
    # 'gelu' (tanh approx, GPT-2) | 'gelu_exact' | 'relu' (OPT) | 'swiglu' (LLaMA) | 'geglu' (Gemma: a gate
    # through tanh-approximated gelu)
    mlp: str = "gelu"
    pos: str = "learned"  # 'learned' | 'rope'
    rope_theta: float = 10000.0
    # Long-context rope frequency scaling (Hugging Face rope_type): 'none' | 'linear' | 'llama3'
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths > original_max_len / low are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths < original_max_len / high are kept
    rope_original_max_len: int = 8192  # llama3: the context the model was first trained with
    # Family features. Gemma's norms scale by (1 + w), w starting at 0 (weight decay pulls them towards 1).
    norm_plus_one: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3: an RMS norm over each query / key head (head_dim) before rope
    post_norms: bool = False  # Gemma 2 / 3: a norm on the attention and MLP outputs before each residual add
    embed_scale: bool = False  # Gemma: token embeddings times sqrt(d_model)
    attn_softcap: float = 0.0  # Gemma 2: attention scores -> c * tanh(scores / c); 0 = off
    final_softcap: float = 0.0  # Gemma 2: logits -> c * tanh(logits / c); 0 = off
    query_scale_dim: float = 0.0  # softmax scale = this ** -0.5 (Gemma's query_pre_attn_scalar); 0: head_dim
    # Local (sliding-window) attention: query i of a local layer sees keys i - W < j <= i (W = sliding_window;
    # 0 = none). layer_types: 'global' | 'local' per layer; () = every layer local when there is a window.
    sliding_window: int = 0
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float = 0.0  # local layers' own rope base, unscaled (Gemma 3: 1e4); 0 = the global rope
    tie_embeddings: bool = True
    qkv_bias: bool = True
    out_bias: bool = True
    mlp_bias: bool = True
    head: str = "lm"  # 'lm' -> logits_BLV | 'scalar' -> values_BL
    scalar_head_init: str = "zero"  # 'zero' | 'normal'
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # see REMAT_POLICIES
    # True: jax.lax.scan over one compiled layer body (compile time independent of depth: accelerators).
    # False: a Python loop over the stacked layers; on CPU XLA then skips copying each layer's params and
    # saved activations in and out of the scan's stacked buffers. None: False on CPU, True elsewhere.
    scan_layers: bool | None = None
    attention_impl: str = "xla"  # 'xla' | 'cudnn' | 'pallas'
    # LM-head losses (gptjax.losses.vocab) build fp32 logits in sequence chunks of at most this many MiB
    # for the whole batch, recomputed in the backward pass; a batch whose logits fit is one chunk.
    logits_chunk_mb: float = 256.0
    # LoRA adapters (gptjax.interop.lora): y = x @ W + (dropout(x) @ A) @ B * (lora_alpha / lora_rank);
    # 0 = off
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ("wq", "wv")
    # How a LoRA role holds its frozen base (QLoRA): '' as loaded (the param dtype), 'int8' (per output
    # channel), 'int4' (group-wise, lora_base_group_size inputs a scale); the blocks' matmul weights only,
    # dequantised one layer at a time in the compute dtype (gptjax.model.quant)
    lora_base_quant: str = ""
    lora_base_group_size: int = 64
    # Read by the run builder only: the architecture fields (CHECKPOINT_FIELDS) come from the checkpoint the
    # role starts from (train.init_from, or the role's own), the rest from this config
    # (gptjax.checkpoint.load.resolve_model_config).
    from_checkpoint: bool = False

    def __post_init__(self):
        for name in ("lora_targets", "layer_types"):  # hashable, so configs can key caches
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        checks = [
            (self.norm in ("layernorm", "rmsnorm"), f"norm={self.norm!r}: use 'layernorm' or 'rmsnorm'"),
            (self.family in FAMILIES, f"family={self.family!r}: use one of {FAMILIES}"),
            (self.mlp in MLPS, f"mlp={self.mlp!r}: use one of {MLPS}"),
            (self.pos in ("learned", "rope"), f"pos={self.pos!r}: use 'learned' or 'rope'"),
            (self.head in ("lm", "scalar"), f"head={self.head!r}: use 'lm' or 'scalar'"),
            (self.remat in REMAT_POLICIES, f"remat={self.remat!r}: use one of {REMAT_POLICIES}"),
            (self.attention_impl in attn_lib.IMPLS, f"attention_impl={self.attention_impl!r}"),
            (self.n_heads % self.kv_heads == 0, f"n_heads={self.n_heads} not a multiple of n_kv_heads"),
            (self.pos != "rope" or self.dim_head % 2 == 0, "rope needs an even head_dim"),
            (self.rope_scaling in ("none", "linear", "llama3"), f"rope_scaling={self.rope_scaling!r}"),
            (self.lora_rank >= 0, f"lora_rank={self.lora_rank} must be >= 0"),
            (
                self.lora_base_quant in LORA_BASE_QUANT,
                f"lora_base_quant={self.lora_base_quant!r}: use one of {LORA_BASE_QUANT}",
            ),
            (self.lora_base_group_size > 0, f"lora_base_group_size={self.lora_base_group_size} must be > 0"),
            (self.logits_chunk_mb > 0, f"logits_chunk_mb={self.logits_chunk_mb} must be > 0"),
            (0.0 <= self.lora_dropout < 1.0, f"lora_dropout={self.lora_dropout} must be in [0, 1)"),
            (
                isinstance(self.lora_targets, (tuple, list)) and set(self.lora_targets) <= set(LORA_TARGETS),
                f"lora_targets={self.lora_targets!r}: choose from {LORA_TARGETS}",
            ),
            (
                self.gated or "w_gate" not in self.lora_targets or self.lora_rank == 0,
                f"lora_targets has 'w_gate' but mlp={self.mlp!r} has no gate projection",
            ),
            (not self.qk_norm or self.norm == "rmsnorm", "qk_norm is an RMS norm: it needs norm='rmsnorm'"),
            (self.attn_softcap >= 0 and self.final_softcap >= 0, "soft-caps must be >= 0 (0 = off)"),
            (
                self.query_scale_dim >= 0,
                f"query_scale_dim={self.query_scale_dim} must be >= 0 (0 = head_dim)",
            ),
            (self.sliding_window >= 0, f"sliding_window={self.sliding_window} must be >= 0 (0 = none)"),
            (
                not self.layer_types or len(self.layer_types) == self.n_layers,
                f"layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}",
            ),
            (
                set(self.layer_types) <= set(LAYER_TYPES),
                f"layer_types={tuple(self.layer_types)!r}: each one of {LAYER_TYPES}",
            ),
            (
                "local" not in self.layer_types or self.sliding_window > 0,
                "layer_types has 'local' layers but sliding_window=0",
            ),
            (
                self.rope_local_theta == 0 or self.pos == "rope",
                f"rope_local_theta={self.rope_local_theta} needs pos='rope'",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")

    @property
    def scan(self) -> bool:
        """Whether layers run under jax.lax.scan (``scan_layers``, resolved by backend when None)."""
        if self.scan_layers is None:
            return jax.default_backend() != "cpu"
        return self.scan_layers

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def dim_ff(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def gated(self) -> bool:
        """Whether the MLP has a gate projection (w_gate): SwiGLU, GeGLU."""
        return self.mlp in GATED_MLPS

    @property
    def attn_scale_dim(self) -> float:
        """What the softmax scale is the inverse square root of: query_scale_dim, or head_dim."""
        return self.query_scale_dim or float(self.dim_head)

    @property
    def local_rope(self) -> float:
        """The local layers' own rope base; 0 when they rotate as the global layers do (or there are none)."""
        if not self.rope_local_theta or not any(self.local_layers):
            return 0.0
        if self.rope_local_theta == self.rope_theta and self.rope_scaling == "none":
            return 0.0
        return self.rope_local_theta

    @property
    def softmax_scale(self) -> float | None:
        """The attention's softmax scale when it is not head_dim ** -0.5 (Gemma), else None."""
        return self.query_scale_dim**-0.5 if self.query_scale_dim else None

    @property
    def local_layers(self) -> tuple[bool, ...]:
        """Per layer: whether it attends through the sliding window."""
        if not self.sliding_window:
            return (False,) * self.n_layers
        if not self.layer_types:
            return (True,) * self.n_layers
        return tuple(t == "local" for t in self.layer_types)

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Per layer: its attention window (0 = global), what sliding_window and layer_types amount to."""
        return tuple(self.sliding_window if local else 0 for local in self.local_layers)

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def gpt2(cls, **kw) -> ModelConfig:
        base = dict(
            family="gpt2",
            norm="layernorm",
            mlp="gelu",
            pos="learned",
            tie_embeddings=True,
            qkv_bias=True,
            out_bias=True,
            mlp_bias=True,
            norm_eps=1e-5,
        )
        return cls(**{**base, **kw})

    @classmethod
    def llama(cls, **kw) -> ModelConfig:
        base = dict(
            family="llama",
            norm="rmsnorm",
            mlp="swiglu",
            pos="rope",
            tie_embeddings=False,
            qkv_bias=False,
            out_bias=False,
            mlp_bias=False,
            norm_eps=1e-5,
        )
        return cls(**{**base, **kw})

    @classmethod
    def qwen3(cls, **kw) -> ModelConfig:
        """Qwen3: LLaMA's block with an RMS norm on each query and key head."""
        return cls.llama(
            **{"family": "qwen3", "qk_norm": True, "norm_eps": 1e-6, "tie_embeddings": True, **kw}
        )

    @classmethod
    def gemma2(cls, **kw) -> ModelConfig:
        """Gemma 2: (1 + w) RMS norms before and after attention and MLP, GeGLU, embeddings scaled by
        sqrt(d_model), soft-capped attention scores and logits, local and global layers alternating (local
        first)."""
        n_layers = kw.get("n_layers", cls.n_layers)
        base = dict(
            family="gemma2",
            norm_plus_one=True,
            mlp="geglu",
            post_norms=True,
            embed_scale=True,
            attn_softcap=50.0,
            final_softcap=30.0,
            norm_eps=1e-6,
            tie_embeddings=True,
            sliding_window=4096,
            layer_types=tuple("local" if i % 2 == 0 else "global" for i in range(n_layers)),
        )
        return cls.llama(**{**base, **kw})

    @classmethod
    def gemma3(cls, **kw) -> ModelConfig:
        """Gemma 3 (text): Gemma 2's block with q / k norms instead of soft-caps, five local layers (rope base
        10k) to each global one (rope base 1M)."""
        n_layers = kw.get("n_layers", cls.n_layers)
        base = dict(
            family="gemma3",
            qk_norm=True,
            attn_softcap=0.0,
            final_softcap=0.0,
            sliding_window=4096,
            layer_types=tuple("global" if (i + 1) % 6 == 0 else "local" for i in range(n_layers)),
            rope_theta=1_000_000.0,
            rope_local_theta=10_000.0,
        )
        return cls.gemma2(**{**base, **kw})

    @classmethod
    def opt(cls, **kw) -> ModelConfig:
        """Meta's OPT: GPT-2's block (pre-LayerNorm, biases, learned positions, tied embeddings) with a ReLU
        MLP, OPT's vocabulary and context."""
        return cls.gpt2(**{"family": "opt", "vocab_size": 50272, "mlp": "relu", "max_len": 2048, **kw})


def unknown_fields(values: dict) -> list[str]:
    """Keys of ``values`` that are not ModelConfig fields (sorted)."""
    return sorted(set(values) - {f.name for f in dataclasses.fields(ModelConfig)})


def config_from_dict(values: dict) -> ModelConfig:
    """ModelConfig from a plain dict (JSON or ConfigDict): lists become the tuples the dataclass holds."""
    return ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# Architecture fields that leave every parameter shape unchanged: only a config comparison catches them.
UNSHAPED_FIELDS = (
    "norm",
    "norm_eps",
    "norm_plus_one",
    "mlp",
    "pos",
    "rope_theta",
    "rope_scaling",
    "rope_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_len",
    "local_rope",
    "embed_scale",
    "attn_softcap",
    "final_softcap",
    "attn_scale_dim",
    "layer_windows",
)
# Fields that define the function a model computes (not its numerics, head or adapters).
ARCH_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "kv_heads",
    "dim_head",
    "dim_ff",
    "max_len",
    *UNSHAPED_FIELDS,
    "tie_embeddings",
    "qkv_bias",
    "out_bias",
    "mlp_bias",
    "qk_norm",
    "post_norms",
)
# What ``from_checkpoint`` takes from a checkpoint: the fields behind ARCH_FIELDS as they are stored, and
# the family (the HF architecture an export writes); a rotary model's max_len stays the config's (the run's
# context: no parameter depends on it).
_DERIVED = {  # ARCH_FIELDS properties -> the fields they are computed from
    "kv_heads": ("n_kv_heads",),
    "dim_head": ("head_dim",),
    "dim_ff": ("d_ff",),
    "layer_windows": ("sliding_window", "layer_types"),
    "local_rope": ("rope_local_theta",),
    "attn_scale_dim": ("query_scale_dim",),
}
CHECKPOINT_FIELDS = (
    "family",
    *(f for f in ARCH_FIELDS if f not in _DERIVED),
    *(f for fields in _DERIVED.values() for f in fields),
)


def arch_differences(ckpt: ModelConfig, cfg: ModelConfig) -> list[str]:
    """'field: ckpt vs cfg' for each architecture field that differs in a way that matters: rope fields
    only when rope is used, the context (max_len) only when positions are learned (rotary ones work at any
    length), a tied embedding only for an LM head (a scalar head has no LM head to tie)."""
    skip = set()
    if ckpt.pos == "rope" and cfg.pos == "rope":
        skip.add("max_len")
    if ckpt.pos != "rope" and cfg.pos != "rope":
        skip.update(f for f in ARCH_FIELDS if f.startswith("rope"))
    if cfg.head != "lm":
        skip.add("tie_embeddings")
    return [
        f"{f}: {getattr(ckpt, f)!r} vs {getattr(cfg, f)!r}"
        for f in ARCH_FIELDS
        if f not in skip and getattr(ckpt, f) != getattr(cfg, f)
    ]


def head_params(cfg: ModelConfig) -> tuple[str, ...]:
    """Names of a scalar head's params: new to a model started from an LM, so they always train in full."""
    return ("value_head", "value_bias") if cfg.head == "scalar" else ()
