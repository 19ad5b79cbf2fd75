"""Gemma 2 and Gemma 3 text checkpoints (Gemma2ForCausalLM, Gemma3ForCausalLM: model_type 'gemma2' and
'gemma3_text').

LLaMA's tensor names and layouts, plus a norm after attention and after the MLP: HF's
``post_attention_layernorm`` is our ``attn_post_norm`` here (LLaMA's is the MLP's input norm), its
``pre_feedforward_layernorm`` our ``mlp_norm``. Norm weights are stored as Gemma keeps them (the model scales
by 1 + w). Gemma 3 adds q / k norms and its own rope per layer kind: ``rope_parameters`` keyed by
'full_attention' / 'sliding_attention' (transformers 5), or rope_theta, rope_scaling and
rope_local_base_freq (4.x). Gemma 3's multimodal checkpoints (model_type 'gemma3') are refused: load a text
model.
"""

from __future__ import annotations

from gptjax import model
from gptjax.interop import hf_llama
from gptjax.interop.hf_mapping import (
    Entry,
    copied,
    field,
    refuse,
    require,
    same,
    windows,
    windows_to_hf,
)

PREFIX = hf_llama.PREFIX
ARCHITECTURES = {"gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
FAMILIES = {"gemma2": "gemma2", "gemma3_text": "gemma3"}  # model_type -> ModelConfig.family
DEFAULT_THETA = {"gemma2": 10_000.0, "gemma3_text": 1_000_000.0}


def _default_kinds(model_type: str, hf: dict, n_layers: int) -> list[str]:
    """HF's layer pattern when config.json lists none: Gemma 2 alternates (local first), Gemma 3 makes every
    ``sliding_window_pattern``-th layer global."""
    period = 2 if model_type == "gemma2" else hf.get("sliding_window_pattern", 6)
    return ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(n_layers)]


def _gemma3_rope(hf: dict, where: str) -> dict:
    """The global layers' rope fields and the local layers' own base (rope_local_theta; 0 = the same rope)."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = params.get("full_attention") or {"rope_type": "default"}
        local = params.get("sliding_attention") or {"rope_type": "default"}
        out = hf_llama._rope({"rope_parameters": full}, where, DEFAULT_THETA["gemma3_text"])
        local_theta = float(local.get("rope_theta", 10_000.0))
        if dict(local) == dict(full):
            return {**out, "rope_local_theta": 0.0}
        if local.get("rope_type", "default") != "default" or set(local) - {"rope_type", "rope_theta"}:
            refuse(where, "rope_parameters.sliding_attention", local, "local layers take a plain rope base")
        return {**out, "rope_local_theta": local_theta}
    out = hf_llama._rope(hf, where, DEFAULT_THETA["gemma3_text"])
    return {**out, "rope_local_theta": float(hf.get("rope_local_base_freq", 10_000.0))}


def config_from_hf(hf: dict, where: str) -> model.ModelConfig:
    model_type = hf["model_type"]
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_new"):
        refuse(where, "hidden_activation", act, "Gemma's MLP is implemented with tanh-approximated gelu")
    require(hf, where, "attention_bias", (False,), False, "biases on Gemma's attention projections")
    require(hf, where, "use_bidirectional_attention", (False, None), False, "bidirectional attention")
    n_heads = field(hf, where, "num_attention_heads")
    d = field(hf, where, "hidden_size")
    n_layers = field(hf, where, "num_hidden_layers")
    head_dim = hf.get("head_dim") or d // n_heads
    kinds = hf.get("layer_types") or _default_kinds(model_type, hf, n_layers)
    if model_type == "gemma2":
        rope = {**hf_llama._rope(hf, where, DEFAULT_THETA["gemma2"]), "rope_local_theta": 0.0}
    else:
        rope = _gemma3_rope(hf, where)
    preset = model.ModelConfig.gemma2 if model_type == "gemma2" else model.ModelConfig.gemma3
    return preset(
        vocab_size=field(hf, where, "vocab_size"),
        d_model=d,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        d_ff=field(hf, where, "intermediate_size"),
        max_len=field(hf, where, "max_position_embeddings"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        **rope,
        **windows(where, hf.get("sliding_window"), kinds),
        query_scale_dim=float(hf.get("query_pre_attn_scalar") or head_dim),
        attn_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
        final_softcap=float(hf.get("final_logit_softcapping") or 0.0),
        tie_embeddings=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.02),
    )


def config_to_hf(cfg: model.ModelConfig) -> dict:
    model_type = {v: k for k, v in FAMILIES.items()}[cfg.family]
    scalar = cfg.query_scale_dim or cfg.dim_head
    if scalar != int(scalar):
        refuse(f"family={cfg.family!r}", "query_scale_dim", scalar, "Hugging Face's Gemma takes an integer")
    out = hf_llama.config_to_hf_common(cfg, model_type, ARCHITECTURES[model_type])
    del out["hidden_act"], out["mlp_bias"]
    window, kinds = windows_to_hf(cfg)
    out.update(
        hidden_activation="gelu_pytorch_tanh" if cfg.mlp == "geglu" else cfg.mlp,
        attention_bias=cfg.qkv_bias,
        query_pre_attn_scalar=int(scalar),
        attn_logit_softcapping=cfg.attn_softcap or None,
        final_logit_softcapping=cfg.final_softcap or None,
        sliding_window=window or cfg.max_len,  # HF wants a number; no layer uses it when none is local
        layer_types=kinds,
        use_bidirectional_attention=False,
    )
    if model_type == "gemma3_text":
        full = out["rope_parameters"]
        local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta} if cfg.rope_local_theta else full
        out["rope_parameters"] = {"full_attention": full, "sliding_attention": local}
        out["rope_local_base_freq"] = local["rope_theta"]  # transformers 4.x
    return out


def entries(cfg: model.ModelConfig) -> list[Entry]:
    ly = PREFIX + "layers.{i}."
    blocks = ("blocks",)
    # LLaMA's table without its post_attention_layernorm (the MLP's input norm there)
    out = [e for e in hf_llama.entries(cfg) if not e.hf.endswith("post_attention_layernorm.weight")]
    norms = {
        "post_attention_layernorm": ("attn_post_norm",),
        "pre_feedforward_layernorm": ("mlp_norm",),
        "post_feedforward_layernorm": ("mlp_post_norm",),
    }
    if cfg.qk_norm:
        norms.update({"self_attn.q_norm": ("attn", "q_norm"), "self_attn.k_norm": ("attn", "k_norm")})
    for name, ours in norms.items():
        out.append(Entry(ly + f"{name}.weight", same(blocks + ours + ("scale",)), *copied()))
    return out


def ignorable(names: set[str], cfg: model.ModelConfig) -> list[str]:
    return hf_llama.ignorable(names, cfg)
