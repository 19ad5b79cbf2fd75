"""The policy as a rollout runs it: LoRA adapters on their frozen base, for generation and for the
experience pass.

A LoRA policy trains adapters only (``Ctx.frozen['base']``: the base weights, possibly quantised). Generation
runs it one of two ways (``rollout.lora_generation``):

- ``'adapters'``: the base as held plus the adapters, each targeted projection adding (x @ A) @ B per
  token: no copy of the weights (a quantised base stays quantised);
- ``'merged'``: the adapters folded into a generation copy of the weights (``lora.merge``, once a rollout):
  plain matmuls per token, at the cost of one more set of weights in memory while generating.

``scripts/bench_lora_generation.py`` measures both. The reference policy of a LoRA run is the same base
with the adapters off (``Ctx.aliases``), never a second copy.
"""

from __future__ import annotations

from typing import Any

from gptjax import model
from gptjax.interop import lora
from gptjax.losses.ctx import Ctx, full_params
from gptjax.model import quant

GENERATION_MODES = ("adapters", "merged")


def generation_config(cfg: model.ModelConfig, mode: str) -> model.ModelConfig:
    """The config generation runs the policy with (``mode``: module doc)."""
    if mode not in GENERATION_MODES:
        raise ValueError(f"rollout.lora_generation={mode!r}: use one of {GENERATION_MODES}")
    return lora.merged_config(cfg) if cfg.lora_rank and mode == "merged" else cfg


def generation_params(cfg: model.ModelConfig, params: Any, mode: str) -> Any:
    """The params generation samples from: ``params`` (a LoRA policy's adapters already on its base) as
    they are, or merged into plain weights (module doc)."""
    if cfg.lora_rank == 0 or mode == "adapters":
        return params
    if quant.has_quantized(params):  # dequantised in the compute dtype: the copy is no wider than needed
        params = quant.dequantize_base(cfg, params, cfg.dtype)
    return lora.merge(cfg, params)[1]


def experience_params(ctx: Ctx, trained: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """{role: params} of the experience pass: the trained roles in ``names`` (LoRA roles' adapters on their
    base) and the frozen ones (a LoRA policy's reference: its base)."""
    full = full_params(trained, ctx)
    frozen = {n for n, _ in ctx.frozen_cfgs}
    return {n: ctx.frozen_params(n) if n in frozen else full[n] for n in names}
