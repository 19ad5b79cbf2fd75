"""Per-token estimators of KL(pi || ref) from the sampled tokens' log-probs (Schulman's k1 / k2 / k3).

The losses use them as loss terms (GRPO's k3), the rollout as the penalty in the reward (``gptjax.rl``
re-exports them as ``gptjax.rl.kl_penalty`` and ``KL_KINDS``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_KINDS = ("k1", "k2", "k3")


def kl_penalty(logp_BT: jax.Array, ref_logp_BT: jax.Array, kind: str = "k1") -> jax.Array:
    """Per-token estimate of KL(pi || ref) from the sampled token's log-probs (Schulman's k1 / k2 / k3).

    k1 = log r, k2 = (log r)^2 / 2, k3 = (1/r - 1) + log r, with r = pi / ref. All three have the true KL as
    expectation (k2 to second order); k2 and k3 are never negative, k3 is unbiased.
    """
    log_r = logp_BT.astype(jnp.float32) - ref_logp_BT.astype(jnp.float32)
    if kind == "k1":
        return log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return jnp.expm1(-log_r) + log_r
    raise ValueError(f"KL estimator kind={kind!r}; use one of {KL_KINDS}")
