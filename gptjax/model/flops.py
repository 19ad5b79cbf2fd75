"""Peak FLOP/s per device and model FLOP utilisation (MFU): one table for the loop, benchmarks, planner."""

from __future__ import annotations

import jax

# Dense bf16 peak FLOP/s per device, by a substring of jax's device_kind (first match wins).
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 197e12),  # v5e reports "TPU v5 lite"
    ("TPU v4", 275e12),
)


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak of ``device`` (default: the first device); None where we do not know it (CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for key, flops in PEAK_FLOPS:
        if key in kind:
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, n_devices: int) -> float | None:
    """Model FLOP utilisation over ``n_devices``: achieved model FLOP/s / peak FLOP/s (None if no peak)."""
    if not peak:
        return None
    return flops_per_token * tokens_per_s / (peak * n_devices)
