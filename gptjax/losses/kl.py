"""Per-token estimators of KL(pi || ref) from the sampled tokens' log-probs: in the reward (``kl_penalty``,
Schulman's k1 / k2 / k3) and as a loss term (``kl_loss``, whose GRADIENT is what matters).

In the reward (``rollout.kl_kind``; ``gptjax.rl`` re-exports ``kl_penalty`` and ``KL_KINDS``) only the value
counts: with u = log pi - log ref at a token sampled from pi,

    k1 = u,   k2 = u^2 / 2,   k3 = (ref / pi - 1) + u = expm1(-u) + u

all estimate KL(pi || ref) (k1 and k3 unbiased, k2 to second order; k2 and k3 never negative).

As a loss term (``loss.kl_estimator`` of GRPO and the objectives built on it) the estimator is
differentiated, and the gradient of the exact KL is

    grad KL(pi || ref) = E_{y ~ pi}[u(y) grad log pi(y)]  (the +1 of grad (pi log pi) has mean 0)

The samples come from pi_old (the rollout's policy); rho = pi / pi_old = exp(logp - old_logp) carries the
gradient through pi and is 1 at a rollout's first visit (pi = pi_old), and E_{pi_old}[rho f] = E_pi[f]:

    estimator  loss term       its gradient per sample      mean over samples from pi_old
    k3         k3              (1 - ref / pi) grad log pi   on-policy grad KL(ref || pi), the FORWARD KL:
                                                            biased (GRPO's, kept for fidelity)
    k2         sg(rho) k2      sg(rho) u grad log pi        grad KL(pi || ref), exact
    k3_ratio   rho k3          rho u grad log pi            exact; and its value has mean KL(pi || ref)
    k1         rho k1          rho (u + 1) grad log pi      exact (the +1 adds zero-mean noise)

sg = stop-gradient. k2's weight is a constant: a rho with gradient would add E_pi[k2 grad log pi] != 0.
rho k1 and rho k3 need the ratio's gradient: E_{pi_old}[rho k](theta) = KL(pi_theta || ref) for every theta,
and d(rho k3) = rho (k3 + 1 - ref / pi) grad log pi = rho u grad log pi, k2's per-sample gradient.
k1 without the ratio has gradient grad log pi, mean 0: it belongs in the reward.

Per token, as PPO's ratio: each term is the KL of the next-token distribution at the token's prefix, the
prefixes held fixed (how earlier tokens change later tokens' KL is the reward-side KL's job), and rho is the
token's ratio. A truncated importance weight for a different sampler (``is_weight_BL``) reweights the
policy-gradient term only (``ppo.clipped_surrogate``), not this one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KL_KINDS = ("k1", "k2", "k3")
KL_LOSS_ESTIMATORS = ("k1", "k2", "k3", "k3_ratio")


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


def kl_loss(
    logp_BT: jax.Array, old_logp_BT: jax.Array, ref_logp_BT: jax.Array, estimator: str = "k3"
) -> jax.Array:
    """Per-token KL(pi || ref) loss term of ``estimator`` (module doc: its gradient in expectation over
    tokens sampled from pi_old); the gradient flows through ``logp_BT`` only."""
    if estimator == "k3":
        return kl_penalty(logp_BT, jax.lax.stop_gradient(ref_logp_BT), "k3")
    if estimator not in KL_LOSS_ESTIMATORS:
        raise ValueError(f"loss.kl_estimator={estimator!r}; use one of {KL_LOSS_ESTIMATORS}")
    logp_BT = logp_BT.astype(jnp.float32)
    ratio_BT = jnp.exp(logp_BT - jax.lax.stop_gradient(old_logp_BT).astype(jnp.float32))
    kind = "k3" if estimator == "k3_ratio" else estimator
    k_BT = kl_penalty(logp_BT, jax.lax.stop_gradient(ref_logp_BT), kind)
    if estimator == "k2":
        return jax.lax.stop_gradient(ratio_BT) * k_BT
    return ratio_BT * k_BT
