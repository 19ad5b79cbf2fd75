"""Per-token arrays of rollout rows: statistics over a mask (mean / variance, whitening) and the shift that
aligns a value head's outputs with the tokens. Pure and jittable; the rollout's experience
(``gptjax.rl.estimators``, which re-exports them) and the losses share them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean_var(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    mean = jnp.sum(x * m) / n
    return mean, jnp.sum(jnp.square(x - mean) * m) / n


def whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked elements (mean kept when ``shift_mean`` is False); 0 off the mask."""
    mean, var = masked_mean_var(x, mask)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(mask, out, 0.0)


def shift_right(x_BL: jax.Array) -> jax.Array:
    """x[t - 1] at t (0 at t = 0): the value head's output at t - 1 is the value of the state before t."""
    return jnp.concatenate([jnp.zeros_like(x_BL[:, :1]), x_BL[:, :-1]], axis=1)
