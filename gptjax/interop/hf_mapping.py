"""The vocabulary the per-family mapping files (``hf_gpt2``, ``hf_opt``, ``hf_llama``, ``hf_qwen3``,
``hf_gemma``) are written in: an ``Entry`` per Hugging Face tensor with both conversions, the conversion
helpers, the sliding-window translation they share, and the refusals that name a config field gptjax
cannot represent exactly (``UnsupportedConfig``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

Path = tuple[str, ...]


class UnsupportedConfig(ValueError):
    """An HF config (or our config, on save) that the other side cannot represent exactly."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor: ``hf`` name ('{i}' = layer), the param paths it holds, and both conversions.

    ``to_ours(hf_array) -> tuple of arrays`` (one per path, one layer's slice for stacked params);
    ``to_hf(*arrays) -> hf_array``.
    """

    hf: str
    ours: tuple[Path, ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def same(path: Path) -> tuple[Path, ...]:
    return (path,)


def ident(x: np.ndarray) -> tuple[np.ndarray]:
    return (x,)


def linear_in(*out_shape: int) -> tuple[Callable, Callable]:
    """torch Linear weight [out, in] <-> our [in, *out_shape]."""
    return (lambda w: (w.T.reshape(-1, *out_shape),), lambda p: p.reshape(p.shape[0], -1).T)


def linear_out(*in_shape: int) -> tuple[Callable, Callable]:
    """torch Linear weight [out, in] <-> our [*in_shape, out] (in = prod(in_shape))."""
    return (lambda w: (w.T.reshape(*in_shape, -1),), lambda p: p.reshape(-1, p.shape[-1]).T)


def reshaped(ours: tuple[int, ...], hf: tuple[int, ...]) -> tuple[Callable, Callable]:
    """Same data, different shape (biases [H*E] <-> [H, E], Conv1D weights [H*E, D] <-> [H, E, D])."""
    return (lambda w: (w.reshape(ours),), lambda p: p.reshape(hf))


def transposed() -> tuple[Callable, Callable]:
    return (lambda w: (w.T,), lambda p: p.T)


def copied() -> tuple[Callable, Callable]:
    return (ident, lambda p: p)


def refuse(where: str, field: str, value: Any, why: str) -> None:
    raise UnsupportedConfig(f"{where}: {field}={value!r} is not supported: {why}")


def require(hf_cfg: dict, where: str, field: str, allowed: tuple, default: Any, why: str) -> Any:
    """hf_cfg[field] (or ``default``), refused unless it is one of ``allowed``."""
    value = hf_cfg.get(field, default)
    if value not in allowed:
        refuse(where, field, value, why)
    return value


def field(hf_cfg: dict, where: str, name: str) -> Any:
    if hf_cfg.get(name) is None:
        raise ValueError(f"{where}: required field {name!r} is missing")
    return hf_cfg[name]


# Hugging Face's per-layer attention kinds -> ModelConfig.layer_types
HF_LAYER_TYPES = {"full_attention": "global", "sliding_attention": "local"}


def windows(where: str, window: int | None, layer_types: list[str]) -> dict:
    """ModelConfig's sliding_window and layer_types for HF's window (None = none) and per-layer kinds:
    (0, ()) when no layer is windowed, () when every layer is."""
    unknown = sorted(set(layer_types) - set(HF_LAYER_TYPES))
    if unknown:
        refuse(where, "layer_types", unknown, f"implemented layer types: {sorted(HF_LAYER_TYPES)}")
    ours = tuple(HF_LAYER_TYPES[t] for t in layer_types)
    if not window or "local" not in ours:
        return {"sliding_window": 0, "layer_types": ()}
    return {"sliding_window": int(window), "layer_types": () if set(ours) == {"local"} else ours}


def windows_to_hf(cfg: Any) -> tuple[int | None, list[str]]:
    """(HF sliding_window or None, HF layer_types) of a ModelConfig."""
    kinds = ["sliding_attention" if local else "full_attention" for local in cfg.local_layers]
    return (cfg.sliding_window or None), kinds
