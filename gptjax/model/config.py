"""The model's configuration: ``ModelConfig`` (a frozen dataclass with presets for the GPT-2, LLaMA and OPT
families) and the helpers that read it without building a model."""

from __future__ import annotations

import dataclasses

import jax

from gptjax.model import attention as attn_lib

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_in", "w_gate", "w_out")  # projections that can carry adapters

# What each layer keeps for the backward pass: none = everything (no recompute), full = nothing, dots =
# every matmul output, dots_no_batch = the weight matmuls' outputs (not attention's batched products). The
# last two also keep the fused attention kernel's output and log-sum-exp (its recompute is the costliest).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics. Use ``ModelConfig.gpt2(...)`` / ``ModelConfig.llama(...)`` presets."""

    family: str = "gpt2"  # 'gpt2' | 'llama' | 'opt': which HF architecture hf.save writes
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
    mlp: str = "gelu"  # 'gelu' (tanh approx, GPT-2) | 'gelu_exact' | 'relu' (OPT) | 'swiglu' (LLaMA)
    pos: str = "learned"  # 'learned' | 'rope'
    rope_theta: float = 10000.0
    # Long-context rope frequency scaling (Hugging Face rope_type): 'none' | 'linear' | 'llama3'
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths > original_max_len / low are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths < original_max_len / high are kept
    rope_original_max_len: int = 8192  # llama3: the context the model was first trained with
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

    def __post_init__(self):
        checks = [
            (self.norm in ("layernorm", "rmsnorm"), f"norm={self.norm!r}: use 'layernorm' or 'rmsnorm'"),
            (self.mlp in ("gelu", "gelu_exact", "relu", "swiglu"), f"mlp={self.mlp!r} is unknown"),
            (self.pos in ("learned", "rope"), f"pos={self.pos!r}: use 'learned' or 'rope'"),
            (self.head in ("lm", "scalar"), f"head={self.head!r}: use 'lm' or 'scalar'"),
            (self.remat in REMAT_POLICIES, f"remat={self.remat!r}: use one of {REMAT_POLICIES}"),
            (self.attention_impl in attn_lib.IMPLS, f"attention_impl={self.attention_impl!r}"),
            (self.n_heads % self.kv_heads == 0, f"n_heads={self.n_heads} not a multiple of n_kv_heads"),
            (self.pos != "rope" or self.dim_head % 2 == 0, "rope needs an even head_dim"),
            (self.rope_scaling in ("none", "linear", "llama3"), f"rope_scaling={self.rope_scaling!r}"),
            (self.lora_rank >= 0, f"lora_rank={self.lora_rank} must be >= 0"),
            (self.logits_chunk_mb > 0, f"logits_chunk_mb={self.logits_chunk_mb} must be > 0"),
            (0.0 <= self.lora_dropout < 1.0, f"lora_dropout={self.lora_dropout} must be in [0, 1)"),
            (
                isinstance(self.lora_targets, (tuple, list)) and set(self.lora_targets) <= set(LORA_TARGETS),
                f"lora_targets={self.lora_targets!r}: choose from {LORA_TARGETS}",
            ),
            (
                self.mlp == "swiglu" or "w_gate" not in self.lora_targets or self.lora_rank == 0,
                f"lora_targets has 'w_gate' but mlp={self.mlp!r} has no gate projection",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"ModelConfig: {msg}")
        if isinstance(self.lora_targets, list):  # hashable, so configs can key caches
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

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
    "mlp",
    "pos",
    "rope_theta",
    "rope_scaling",
    "rope_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_len",
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
)


def head_params(cfg: ModelConfig) -> tuple[str, ...]:
    """Names of a scalar head's params: new to a model started from an LM, so they always train in full."""
    return ("value_head", "value_bias") if cfg.head == "scalar" else ()
