"""Qwen3 checkpoints (Qwen3ForCausalLM): LLaMA's block with an RMS norm over each query and key head (before
rope), ``attention_bias`` on all four projections, and Qwen2's optional sliding-window layers."""

from __future__ import annotations

from gptjax import model
from gptjax.interop import hf_llama
from gptjax.interop.hf_mapping import Entry, copied, same

PREFIX = hf_llama.PREFIX


def config_from_hf(hf: dict, where: str) -> model.ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return model.ModelConfig.qwen3(**hf_llama.config_kwargs(hf, where), qkv_bias=bias, out_bias=bias)


def config_to_hf(cfg: model.ModelConfig) -> dict:
    out = hf_llama.config_to_hf_common(cfg, "qwen3", "Qwen3ForCausalLM")
    out["attention_bias"] = cfg.qkv_bias
    out.update(hf_llama.qwen_windows_to_hf(cfg))
    return out


def entries(cfg: model.ModelConfig) -> list[Entry]:
    ly = PREFIX + "layers.{i}.self_attn."
    return [
        *hf_llama.entries(cfg),
        Entry(ly + "q_norm.weight", same(("blocks", "attn", "q_norm", "scale")), *copied()),
        Entry(ly + "k_norm.weight", same(("blocks", "attn", "k_norm", "scale")), *copied()),
    ]


def ignorable(names: set[str], cfg: model.ModelConfig) -> list[str]:
    return hf_llama.ignorable(names, cfg)
