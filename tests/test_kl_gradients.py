"""The KL loss terms' gradients (gptjax.losses.kl.kl_loss) against the exact gradient of KL(pi || ref).

A categorical policy over 6 logits and a fixed reference: KL(pi || ref) and its gradient with respect to the
logits are exact in closed form. Each offered estimator, differentiated at 200k tokens sampled from pi (on
policy) or from a slightly different pi_old (with the ratio pi / pi_old), must average to the exact gradient
within a few standard errors of its per-sample gradients; GRPO's k3 without the ratio must not (on policy it
averages to the gradient of the forward KL(ref || pi) instead).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.losses import kl

N = 200_000
LOGITS = np.array([0.8, -0.3, 0.5, -1.2, 0.1, 1.0], np.float32)
REF_LOGITS = np.array([-0.5, 0.9, 0.2, 0.7, -1.0, -0.2], np.float32)
OLD_SHIFT = np.array([0.15, -0.1, 0.05, 0.2, -0.15, -0.05], np.float32)  # pi_old: a policy one update behind
EXACT = ("k1", "k2", "k3_ratio")  # the estimators with the exact gradient
Z_MAX = 4.5  # standard errors; seeded, so the draw is fixed


def reverse_kl(theta):
    """KL(pi || ref), pi = softmax(theta), in closed form."""
    logp, ref = jax.nn.log_softmax(theta), jax.nn.log_softmax(REF_LOGITS)
    return jnp.sum(jnp.exp(logp) * (logp - ref))


def forward_kl(theta):
    """KL(ref || pi) in closed form."""
    logp, ref = jax.nn.log_softmax(theta), jax.nn.log_softmax(REF_LOGITS)
    return jnp.sum(jnp.exp(ref) * (ref - logp))


@jax.jit
def per_sample(theta, old_logits, key):
    """{estimator: (each sample's loss term, its gradient in the logits)}, y ~ pi_old = softmax(old_logits)"""
    y_N = jax.random.categorical(key, old_logits, shape=(N,))
    old_N = jax.nn.log_softmax(old_logits)[y_N]
    ref_N = jax.nn.log_softmax(REF_LOGITS)[y_N]
    out = {}
    for estimator in kl.KL_LOSS_ESTIMATORS:

        def term(t, y, old, ref, estimator=estimator):
            return kl.kl_loss(jax.nn.log_softmax(t)[y], old, ref, estimator)

        out[estimator] = jax.vmap(jax.value_and_grad(term), in_axes=(None, 0, 0, 0))(theta, y_N, old_N, ref_N)
    return out


def mean_and_se(x):
    x = np.asarray(x, np.float64)
    return x.mean(0), x.std(0, ddof=1) / np.sqrt(len(x))


def z_scores(grads_NV, want_V):
    mean, se = mean_and_se(grads_NV)
    return np.abs(mean - np.asarray(want_V, np.float64)) / np.maximum(se, 1e-12)


@pytest.mark.parametrize("on_policy", [True, False], ids=["on_policy", "off_policy"])
def test_offered_estimators_have_the_exact_gradient_of_kl_pi_ref(on_policy):
    theta = jnp.asarray(LOGITS)
    old_logits = theta if on_policy else theta + OLD_SHIFT
    exact = jax.grad(reverse_kl)(theta)
    # the closed form by hand: d KL / d theta_j = pi_j (u_j - KL), u = log pi - log ref
    pi, u = jax.nn.softmax(theta), jax.nn.log_softmax(theta) - jax.nn.log_softmax(REF_LOGITS)
    np.testing.assert_allclose(exact, pi * (u - reverse_kl(theta)), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(exact).max()) > 0.1

    samples = per_sample(theta, old_logits, jax.random.key(1 if on_policy else 2))
    for estimator in EXACT:
        values, grads = samples[estimator]
        z = z_scores(grads, exact)
        assert z.max() < Z_MAX, (estimator, z)
        if estimator != "k2":  # rho k1 and rho k3 are also unbiased estimates of the KL's value
            mean, se = mean_and_se(values)
            assert abs(mean - float(reverse_kl(theta))) < Z_MAX * se, (estimator, mean, se)

    # GRPO's k3 in the loss: far from the exact gradient (tens of standard errors)
    values, grads = samples["k3"]
    assert z_scores(grads, exact).max() > 20
    if on_policy:  # ... because it follows the forward KL's
        assert z_scores(grads, jax.grad(forward_kl)(theta)).max() < Z_MAX
        mean, se = mean_and_se(values)  # its value is still unbiased on-policy
        assert abs(mean - float(reverse_kl(theta))) < Z_MAX * se


def test_kl_loss_values_at_the_sampling_policy():
    """At pi = pi_old the ratio is 1: each term's value is its estimator's (kl_penalty); an unknown name is
    refused."""
    logp = jnp.array([-1.0, -0.2, -3.0])
    ref = jnp.array([-1.5, -0.1, -1.0])
    u = np.asarray(logp - ref)
    want = {"k1": u, "k2": 0.5 * u**2, "k3": np.expm1(-u) + u, "k3_ratio": np.expm1(-u) + u}
    for estimator, w in want.items():
        np.testing.assert_allclose(kl.kl_loss(logp, logp, ref, estimator), w, rtol=1e-5)
    old = logp - 0.5  # pi / pi_old = e^0.5: k1 and k3_ratio scale by it, and k2's weight (no gradient)
    np.testing.assert_allclose(kl.kl_loss(logp, old, ref, "k2"), np.exp(0.5) * 0.5 * u**2, rtol=1e-5)
    np.testing.assert_allclose(kl.kl_loss(logp, old, ref, "k3"), want["k3"], rtol=1e-5)  # no ratio
    with pytest.raises(ValueError, match="kl_estimator='k4'"):
        kl.kl_loss(logp, logp, ref, "k4")
