"""OPT in Hugging Face format (OPTForCausalLM): learned positions offset by 2, ReLU MLP, Linear weights."""

from __future__ import annotations

import numpy as np

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
)

PREFIX = "model."
POS_OFFSET = 2  # HF OPT reserves the first two rows of embed_positions (padding positions)
ACTIVATIONS = {"relu": "relu", "gelu": "gelu_exact", "gelu_new": "gelu"}


def config_from_hf(hf: dict, where: str) -> model.ModelConfig:
    act = hf.get("activation_function", "relu")
    if act not in ACTIVATIONS:
        refuse(where, "activation_function", act, f"use one of {sorted(ACTIVATIONS)}")
    require(
        hf, where, "do_layer_norm_before", (True,), True, "post-norm blocks (only pre-norm is implemented)"
    )
    require(hf, where, "_remove_final_layer_norm", (False,), False, "a model without the final LayerNorm")
    require(hf, where, "layer_norm_elementwise_affine", (True,), True, "LayerNorm without scale and bias")
    d = field(hf, where, "hidden_size")
    proj = hf.get("word_embed_proj_dim", d)
    if proj != d:
        refuse(where, "word_embed_proj_dim", proj, f"embedding projections (it must equal hidden_size={d})")
    bias = hf.get("enable_bias", True)
    return model.ModelConfig(
        family="opt",
        vocab_size=field(hf, where, "vocab_size"),
        d_model=d,
        n_layers=field(hf, where, "num_hidden_layers"),
        n_heads=field(hf, where, "num_attention_heads"),
        d_ff=field(hf, where, "ffn_dim"),
        max_len=field(hf, where, "max_position_embeddings"),
        norm="layernorm",
        norm_eps=1e-5,  # torch.nn.LayerNorm's default, which OPT uses
        mlp=ACTIVATIONS[act],
        pos="learned",
        tie_embeddings=hf.get("tie_word_embeddings", True),
        qkv_bias=bias,
        out_bias=bias,
        mlp_bias=bias,
        init_std=hf.get("init_std", 0.02),
    )


def config_to_hf(cfg: model.ModelConfig) -> dict:
    act = {"relu": "relu", "gelu_exact": "gelu", "gelu": "gelu_new"}.get(cfg.mlp, cfg.mlp)
    return {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "word_embed_proj_dim": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "ffn_dim": cfg.dim_ff,
        "max_position_embeddings": cfg.max_len,
        "activation_function": act,
        "do_layer_norm_before": True,
        "_remove_final_layer_norm": False,
        "layer_norm_elementwise_affine": True,
        "enable_bias": cfg.qkv_bias,
        "tie_word_embeddings": cfg.tie_embeddings,
        "init_std": cfg.init_std,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "layerdrop": 0.0,
    }


def entries(cfg: model.ModelConfig) -> list[Entry]:
    H, E = cfg.n_heads, cfg.dim_head
    dec = PREFIX + "decoder."
    ly = dec + "layers.{i}."
    attn, mlp = ("blocks", "attn"), ("blocks", "mlp")

    def norm(hf_name, ours):
        return [
            Entry(hf_name + ".weight", same(ours + ("scale",)), *copied()),
            Entry(hf_name + ".bias", same(ours + ("bias",)), *copied()),
        ]

    out = [
        Entry(dec + "embed_tokens.weight", same(("embed",)), *copied()),
        Entry(
            dec + "embed_positions.weight",
            same(("pos_embed",)),
            lambda w: (w[POS_OFFSET:],),
            lambda p: np.concatenate([np.zeros((POS_OFFSET, p.shape[1]), p.dtype), p]),
        ),
        *norm(ly + "self_attn_layer_norm", ("blocks", "attn_norm")),
        *norm(ly + "final_layer_norm", ("blocks", "mlp_norm")),
        *norm(dec + "final_layer_norm", ("final_norm",)),
    ]
    for name, ours in (("q", "wq"), ("k", "wk"), ("v", "wv")):
        out.append(Entry(ly + f"self_attn.{name}_proj.weight", same(attn + (ours,)), *linear_in(H, E)))
        if cfg.qkv_bias:
            out.append(
                Entry(
                    ly + f"self_attn.{name}_proj.bias",
                    same(attn + ("b" + name,)),
                    *reshaped((H, E), (H * E,)),
                )
            )
    out.append(Entry(ly + "self_attn.out_proj.weight", same(attn + ("wo",)), *linear_out(H, E)))
    out.append(Entry(ly + "fc1.weight", same(mlp + ("w_in",)), *transposed()))
    out.append(Entry(ly + "fc2.weight", same(mlp + ("w_out",)), *transposed()))
    if cfg.out_bias:
        out.append(Entry(ly + "self_attn.out_proj.bias", same(attn + ("bo",)), *copied()))
    if cfg.mlp_bias:
        out.append(Entry(ly + "fc1.bias", same(mlp + ("b_in",)), *copied()))
        out.append(Entry(ly + "fc2.bias", same(mlp + ("b_out",)), *copied()))
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", same(("lm_head",)), *transposed()))
    return out


def ignorable(names: set[str], cfg: model.ModelConfig) -> list[str]:
    """A tied LM head stored anyway."""
    return ["lm_head.weight"] if cfg.tie_embeddings and "lm_head.weight" in names else []
