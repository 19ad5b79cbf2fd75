"""LLaMA-family checkpoints (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM).

HF's q/k/v projections are already in the rotate-half rotary layout that ``layers.rope`` uses, so the weights
only change from torch Linear [out, in] to our [in, heads, head_dim]. Qwen2 is LLaMA with q/k/v biases and
optional sliding-window layers (``use_sliding_window``: the layers from ``max_window_layers`` on, or its
``layer_types``); Mistral is LLaMA with every layer windowed when its ``sliding_window`` is set. An export
picks Qwen2 for q/k/v biases, Mistral for windows, LLaMA otherwise.
"""

from __future__ import annotations

from gptjax import model
from gptjax.interop.hf_mapping import (
    Entry,
    copied,
    field,
    linear_in,
    linear_out,
    refuse,
    require,
    reshaped,
    same,
    transposed,
    windows,
    windows_to_hf,
)

PREFIX = "model."
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}


ROPE_KEYS = {  # HF rope parameter -> ModelConfig field
    "factor": "rope_factor",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "original_max_position_embeddings": "rope_original_max_len",
}
ROPE_TYPES = {
    "default": ("none", ()),
    "linear": ("linear", ("factor",)),
    "llama3": ("llama3", tuple(ROPE_KEYS)),
}


def _rope(hf: dict, where: str, default_theta: float = 10000.0) -> dict:
    """Rope fields of ModelConfig from ``rope_parameters`` (transformers 5) or rope_theta + rope_scaling."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in ROPE_TYPES:
        refuse(where, f"{key}.rope_type", kind, f"implemented rope types: {sorted(ROPE_TYPES)}")
    scaling, needed = ROPE_TYPES[kind]
    out = {
        "rope_theta": float(params.pop("rope_theta", hf.get("rope_theta", default_theta))),
        "rope_scaling": scaling,
    }
    for name in needed:
        if name not in params:
            raise ValueError(f"{where}: {key} of rope_type {kind!r} needs {name!r}")
        out[ROPE_KEYS[name]] = type(getattr(model.ModelConfig, ROPE_KEYS[name]))(params.pop(name))
    extra = {k: v for k, v in params.items() if v is not None and not (k == "attention_factor" and v == 1.0)}
    if extra:
        refuse(where, f"{key}.{sorted(extra)[0]}", extra[sorted(extra)[0]], f"not used by rope_type {kind!r}")
    partial = hf.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        refuse(where, "partial_rotary_factor", partial, "rotary embedding on part of each head")
    return out


def _rope_to_hf(cfg: model.ModelConfig) -> dict:
    kind = {v[0]: k for k, v in ROPE_TYPES.items()}[cfg.rope_scaling]
    params = {"rope_type": kind, "rope_theta": cfg.rope_theta}
    params.update({k: getattr(cfg, ROPE_KEYS[k]) for k in ROPE_TYPES[kind][1]})
    return params


def _llama_windows(hf: dict, where: str, n_layers: int) -> dict:
    """Sliding-window fields: Qwen2's (and Qwen3's) windowed layers, Mistral's window on every layer."""
    model_type = hf["model_type"]
    if model_type == "mistral":
        return windows(where, hf.get("sliding_window"), ["sliding_attention"] * n_layers)
    if model_type in ("qwen2", "qwen3"):
        window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
        first = hf.get("max_window_layers", 28)
        kinds = hf.get("layer_types") or [
            "sliding_attention" if window and i >= first else "full_attention" for i in range(n_layers)
        ]
        return windows(where, window, kinds)
    kinds = set(hf.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        refuse(where, "layer_types", sorted(kinds), "LLaMA has full attention in every layer")
    return windows(where, None, [])


def config_kwargs(hf: dict, where: str) -> dict:
    """The ModelConfig fields every LLaMA-like family (LLaMA, Mistral, Qwen2, Qwen3) reads alike."""
    require(hf, where, "hidden_act", ("silu",), "silu", "only SwiGLU (silu-gated) MLPs are implemented")
    require(hf, where, "mlp_bias", (False,), False, "a bias on the gate projection, which our SwiGLU lacks")
    n_heads = field(hf, where, "num_attention_heads")
    d = field(hf, where, "hidden_size")
    n_layers = field(hf, where, "num_hidden_layers")
    return dict(
        vocab_size=field(hf, where, "vocab_size"),
        d_model=d,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d // n_heads,
        d_ff=field(hf, where, "intermediate_size"),
        max_len=field(hf, where, "max_position_embeddings"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        **_rope(hf, where),
        **_llama_windows(hf, where, n_layers),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        mlp_bias=False,
        init_std=hf.get("initializer_range", 0.02),
    )


def config_from_hf(hf: dict, where: str) -> model.ModelConfig:
    model_type = hf["model_type"]
    if model_type == "qwen2":
        qkv_bias, out_bias = True, False
    elif model_type == "mistral":
        qkv_bias = out_bias = False  # MistralForCausalLM has no attention biases
    else:
        qkv_bias = out_bias = bool(hf.get("attention_bias", False))
    return model.ModelConfig.llama(**config_kwargs(hf, where), qkv_bias=qkv_bias, out_bias=out_bias)


def config_to_hf_common(cfg: model.ModelConfig, model_type: str, architecture: str) -> dict:
    """The config.json entries every LLaMA-like family writes alike."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.dim_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_head,
        "max_position_embeddings": cfg.max_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu" if cfg.mlp == "swiglu" else cfg.mlp,
        "rope_parameters": _rope_to_hf(cfg),
        # transformers 4.x reads these two instead
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_to_hf(cfg) if cfg.rope_scaling != "none" else None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "mlp_bias": cfg.mlp_bias,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
    }


def qwen_windows_to_hf(cfg: model.ModelConfig) -> dict:
    """Qwen2 / Qwen3's window settings: layer_types (transformers 5) and max_window_layers (4.x: the layers
    from it on are windowed)."""
    window, kinds = windows_to_hf(cfg)
    first = next((i for i, k in enumerate(kinds) if k == "sliding_attention"), cfg.n_layers)
    return {
        "use_sliding_window": window is not None,
        "sliding_window": window,
        "max_window_layers": first,
        "layer_types": kinds,
    }


def config_to_hf(cfg: model.ModelConfig) -> dict:
    # q/k/v biases without an output bias is Qwen2; LLaMA's attention_bias covers all four projections;
    # windows without biases are Mistral's.
    if cfg.qkv_bias and not cfg.out_bias:
        model_type = "qwen2"
    else:
        model_type = "mistral" if cfg.sliding_window and any(cfg.local_layers) else "llama"
    out = config_to_hf_common(cfg, model_type, ARCHITECTURES[model_type])
    if model_type == "llama":
        out["attention_bias"] = cfg.qkv_bias
    elif model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    else:
        out.update(qwen_windows_to_hf(cfg))
    return out


def entries(cfg: model.ModelConfig) -> list[Entry]:
    H, K, E = cfg.n_heads, cfg.kv_heads, cfg.dim_head
    ly = PREFIX + "layers.{i}."
    attn, mlp = ("blocks", "attn"), ("blocks", "mlp")
    out = [
        Entry(PREFIX + "embed_tokens.weight", same(("embed",)), *copied()),
        Entry(ly + "input_layernorm.weight", same(("blocks", "attn_norm", "scale")), *copied()),
        Entry(ly + "post_attention_layernorm.weight", same(("blocks", "mlp_norm", "scale")), *copied()),
        Entry(PREFIX + "norm.weight", same(("final_norm", "scale")), *copied()),
        Entry(ly + "self_attn.o_proj.weight", same(attn + ("wo",)), *linear_out(H, E)),
        Entry(ly + "mlp.gate_proj.weight", same(mlp + ("w_gate",)), *transposed()),
        Entry(ly + "mlp.up_proj.weight", same(mlp + ("w_in",)), *transposed()),
        Entry(ly + "mlp.down_proj.weight", same(mlp + ("w_out",)), *transposed()),
    ]
    for name, heads in (("q", H), ("k", K), ("v", K)):
        out.append(
            Entry(ly + f"self_attn.{name}_proj.weight", same(attn + (f"w{name}",)), *linear_in(heads, E))
        )
        if cfg.qkv_bias:
            bias = reshaped((heads, E), (heads * E,))
            out.append(Entry(ly + f"self_attn.{name}_proj.bias", same(attn + (f"b{name}",)), *bias))
    if cfg.out_bias:
        out.append(Entry(ly + "self_attn.o_proj.bias", same(attn + ("bo",)), *copied()))
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", same(("lm_head",)), *transposed()))
    return out


def ignorable(names: set[str], cfg: model.ModelConfig) -> list[str]:
    """Rotary frequency buffers of old checkpoints, and a tied LM head stored anyway."""
    extra = [n for n in names if n.endswith(".rotary_emb.inv_freq")]
    if cfg.tie_embeddings and "lm_head.weight" in names:
        extra.append("lm_head.weight")
    return extra
