"""GPT-2 in Hugging Face format (GPT2LMHeadModel): Conv1D weights stored [in, out], fused c_attn."""

from __future__ import annotations

import numpy as np

from gptjax import model
from gptjax.interop.hf_mapping import Entry, copied, field, refuse, require, reshaped, same, transposed

PREFIX = "transformer."
ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "relu": "relu"}


def config_from_hf(hf: dict, where: str) -> model.ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        refuse(where, "activation_function", act, f"use one of {sorted(ACTIVATIONS)}")
    require(hf, where, "scale_attn_weights", (True,), True, "attention without 1/sqrt(head_dim) scaling")
    require(hf, where, "scale_attn_by_inverse_layer_idx", (False,), False, "per-layer attention scaling")
    require(hf, where, "add_cross_attention", (False,), False, "cross-attention layers")
    d = field(hf, where, "n_embd")
    return model.ModelConfig.gpt2(
        vocab_size=field(hf, where, "vocab_size"),
        d_model=d,
        n_layers=field(hf, where, "n_layer"),
        n_heads=field(hf, where, "n_head"),
        d_ff=hf.get("n_inner") or 4 * d,
        max_len=field(hf, where, "n_positions"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp=ACTIVATIONS[act],
        tie_embeddings=hf.get("tie_word_embeddings", True),
        init_std=hf.get("initializer_range", 0.02),
    )


def config_to_hf(cfg: model.ModelConfig) -> dict:
    act = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}.get(cfg.mlp, cfg.mlp)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.dim_ff,
        "n_positions": cfg.max_len,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": act,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        # Everything below keeps HF's forward pass identical to ours.
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }


def entries(cfg: model.ModelConfig) -> list[Entry]:
    D, H, E = cfg.d_model, cfg.n_heads, cfg.dim_head
    h = PREFIX + "h.{i}."
    attn, mlp = ("blocks", "attn"), ("blocks", "mlp")
    qkv = (attn + ("wq",), attn + ("wk",), attn + ("wv",))
    qkv_b = (attn + ("bq",), attn + ("bk",), attn + ("bv",))

    def split_w(w):  # c_attn [D, 3*H*E] -> wq, wk, wv [D, H, E]
        return tuple(x.reshape(D, H, E) for x in np.split(w, 3, axis=1))

    def split_b(b):
        return tuple(x.reshape(H, E) for x in np.split(b, 3))

    def norm(hf_name, ours):
        return [
            Entry(hf_name + ".weight", same(ours + ("scale",)), *copied()),
            Entry(hf_name + ".bias", same(ours + ("bias",)), *copied()),
        ]

    out = [
        Entry(PREFIX + "wte.weight", same(("embed",)), *copied()),
        Entry(PREFIX + "wpe.weight", same(("pos_embed",)), *copied()),
        *norm(h + "ln_1", ("blocks", "attn_norm")),
        Entry(
            h + "attn.c_attn.weight",
            qkv,
            split_w,
            lambda q, k, v: np.concatenate([x.reshape(D, H * E) for x in (q, k, v)], axis=1),
        ),
        Entry(
            h + "attn.c_attn.bias", qkv_b, split_b, lambda *qkv: np.concatenate([x.reshape(-1) for x in qkv])
        ),
        Entry(h + "attn.c_proj.weight", same(attn + ("wo",)), *reshaped((H, E, D), (H * E, D))),
        Entry(h + "attn.c_proj.bias", same(attn + ("bo",)), *copied()),
        *norm(h + "ln_2", ("blocks", "mlp_norm")),
        Entry(h + "mlp.c_fc.weight", same(mlp + ("w_in",)), *copied()),
        Entry(h + "mlp.c_fc.bias", same(mlp + ("b_in",)), *copied()),
        Entry(h + "mlp.c_proj.weight", same(mlp + ("w_out",)), *copied()),
        Entry(h + "mlp.c_proj.bias", same(mlp + ("b_out",)), *copied()),
        *norm(PREFIX + "ln_f", ("final_norm",)),
    ]
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", same(("lm_head",)), *transposed()))
    return out


def ignorable(names: set[str], cfg: model.ModelConfig) -> list[str]:
    """Causal-mask buffers of old checkpoints, and a tied LM head stored anyway."""
    extra = [n for n in names if n.endswith((".attn.bias", ".attn.masked_bias"))]
    if cfg.tie_embeddings and "lm_head.weight" in names:
        extra.append("lm_head.weight")
    return extra
