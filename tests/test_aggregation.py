"""The clipped-surrogate objectives' options for verifiable-reward runs: loss aggregation (token_mean,
seq_mean_token_sum, seq_mean_token_sum_norm, seq_mean_token_mean) against a numpy oracle and exact through 1
or 4 micro-batches, the KL term's estimator, truncated importance weights on the policy-gradient term,
DAPO's clip-higher and Dr. GRPO's unscaled advantages.

The policy is a stand-in (``unigram``): log pi(token at t) = log_softmax(w[t] / temperature)[token], and the
value head a table per token id. The losses' arithmetic is what is under test, and a transformer would only
add compile time (tests/test_group_rl.py and tests/test_objectives.py run the real model through them).
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import FrozenConfigDict

from gptjax import losses
from gptjax.losses import dapo, dr_grpo, grpo, kl, ppo
from gptjax.train import defaults
from gptjax.train import step as step_lib

V, L, T = 6, 12, 0.7
PROMPT_LENGTHS = [1, 2, 3, 1, 4, 2, 1, 3]
LENGTHS = [12, 5, 3, 8, 12, 10, 3, 11]  # responses of 11, 3, 0, 7, 8, 8, 2 and 8 tokens


def stand_in_logp(params, batch, temperature):
    logp_LV = jax.nn.log_softmax(params["policy"]["w"] / temperature, axis=-1)
    return jnp.take_along_axis(logp_LV[None], batch["tokens_BL"][..., None], axis=-1)[..., 0], logp_LV


@pytest.fixture
def unigram(monkeypatch):
    def policy_terms(cfg, params, batch, temperature):
        logp_BL, logp_LV = stand_in_logp({"policy": params}, batch, temperature)
        entropy_L = -jnp.sum(jnp.exp(logp_LV) * logp_LV, axis=-1)
        return logp_BL, jnp.broadcast_to(entropy_L, logp_BL.shape)

    monkeypatch.setattr(ppo, "policy_terms", policy_terms)
    monkeypatch.setattr(
        ppo, "model", types.SimpleNamespace(apply=lambda cfg, p, tokens_BL: p["v"][tokens_BL])
    )
    r = np.random.default_rng(0)
    params = {
        "policy": {"w": jnp.asarray(r.normal(0.0, 1.0, (L, V)), jnp.float32)},
        "value": {"v": jnp.asarray(r.normal(0.0, 1.0, V), jnp.float32)},
    }
    return params


def make_batch(params, seed=1):
    r = np.random.default_rng(seed)
    B = len(LENGTHS)
    batch = {
        "tokens_BL": r.integers(0, V, (B, L)).astype(np.int32),
        "prompt_lengths_B": np.array(PROMPT_LENGTHS, np.int32),
        "lengths_B": np.array(LENGTHS, np.int32),
        "advantages_BL": np.repeat(r.normal(size=(B, 1)), L, 1).astype(np.float32),
        "old_values_BL": r.normal(size=(B, L)).astype(np.float32),
        "returns_BL": r.normal(size=(B, L)).astype(np.float32),
    }
    logp = np.asarray(stand_in_logp(params, batch, T)[0])
    batch["old_logp_BL"] = (logp + r.normal(0.0, 0.3, (B, L))).astype(np.float32)  # the clip is exercised
    batch["ref_logp_BL"] = (logp + r.normal(0.0, 0.5, (B, L))).astype(np.float32)
    return jax.tree.map(jnp.asarray, batch)


def ctx_of(name, **loss):
    return step_lib.Ctx(
        model_cfg=None,
        loss_cfg=FrozenConfigDict({"name": name, **loss}),
        role_cfgs=(("policy", None), ("value", None)),
        scalars={"temperature": jnp.float32(T)},
    )


def evaluate(params, cases):
    """[(loss, grads, metrics)] of each case (name, batch, micro-batches, loss options) as the train step
    sees them (sums over micro-batches / the loss's count), all in ONE compiled program: on CPU compiling is
    most of a case's time, and each compile has its own overhead."""
    specs = [(losses.objective(name), ctx_of(name, **opts), micro) for name, _, micro, opts in cases]

    @jax.jit
    def run(params, batches):
        out = []
        for (obj, ctx, micro), batch in zip(specs, batches, strict=True):
            ctx = step_lib.with_denominators(ctx, batch, obj.denominators)
            g, m = step_lib.grads_and_metrics(obj.loss_fn, params, batch, jax.random.key(0), ctx, micro)
            count = m["loss"][1]
            grads = jax.tree.map(lambda x, c=count: x / c, g)
            out.append((m["loss"][0] / count, grads, step_lib.reduce_metrics(m)))
        return out

    return run(params, [batch for _, batch, _, _ in cases])


def oracle(batch, params, how, kl_coef, length_norm=0.0, clip=0.2):
    """GRPO's loss in numpy: x = clipped surrogate + kl_coef k3 per response token, aggregated ``how``."""
    b = jax.tree.map(np.asarray, batch)
    logp = np.asarray(stand_in_logp(params, batch, T)[0], np.float64)
    mask = np.asarray(ppo.rollout_mask(b))
    ratio, adv = np.exp(logp - b["old_logp_BL"]), b["advantages_BL"]
    u = logp - b["ref_logp_BL"]
    x = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip)) + kl_coef * (np.expm1(-u) + u)
    n_B = mask.sum(1)
    rows = [np.sum(x[i][mask[i]]) for i in range(len(x)) if n_B[i] > 0]
    means = [np.mean(x[i][mask[i]]) for i in range(len(x)) if n_B[i] > 0]
    return {
        "token_mean": np.sum(rows) / n_B.sum(),
        "seq_mean_token_sum": np.mean(rows),
        "seq_mean_token_sum_norm": np.mean(rows) / (length_norm or L),
        "seq_mean_token_mean": np.mean(means),
    }[how]


def same(one, four, what):
    """The train step's loss, metrics and gradient through 1 and 4 micro-batches."""
    (l1, g1, m1), (l4, g4, m4) = one, four
    np.testing.assert_allclose(l1, l4, rtol=1e-5, atol=1e-7, err_msg=what)
    for k in m1:
        np.testing.assert_allclose(m1[k], m4[k], rtol=1e-5, atol=1e-7, err_msg=f"{what} {k}")
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6, err_msg=what)
    flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(g1)])
    assert np.abs(flat).max() > 1e-3, what
    return flat / np.linalg.norm(flat)


def test_each_aggregation_against_a_numpy_oracle_through_1_and_4_micro_batches(unigram):
    """GRPO with its KL term. Rows i, i + 4 form micro-batch i: 19, 3 + 8, 0 + 2 and 15 response tokens in 2,
    2, 1 and 2 responses, so dividing by a micro-batch's own counts would show."""
    params = unigram
    batch = make_batch(params)
    assert np.asarray(ppo.denominators(batch, None)["responses"]) == 7  # the empty row is no response
    settings = [
        ("token_mean", 0.0),
        ("seq_mean_token_sum", 0.0),
        ("seq_mean_token_sum_norm", 0.0),
        ("seq_mean_token_sum_norm", 16.0),
        ("seq_mean_token_mean", 0.0),
    ]
    cases = [
        ("grpo", batch, micro, {"aggregation": a, "length_norm": n, "kl_coef": 0.3})
        for a, n in settings
        for micro in (1, 4)
    ]
    out = evaluate(params, cases)
    unit = {}
    for i, (how, norm) in enumerate(settings):
        loss, _, m = out[2 * i]
        np.testing.assert_allclose(loss, oracle(batch, params, how, 0.3, norm), rtol=1e-5, err_msg=how)
        assert 0.05 < float(m["policy_clipfrac"]) < 0.95
        unit[how, norm] = same(out[2 * i], out[2 * i + 1], how)
    # the aggregations weigh the tokens differently: other directions, not just scales
    assert abs(unit["token_mean", 0.0] @ unit["seq_mean_token_mean", 0.0]) < 0.9999
    assert abs(unit["seq_mean_token_sum", 0.0] @ unit["seq_mean_token_mean", 0.0]) < 0.9999
    np.testing.assert_allclose(
        unit["seq_mean_token_sum", 0.0], unit["seq_mean_token_sum_norm", 16.0], atol=1e-5
    )
    with pytest.raises(ValueError, match="loss.aggregation='seq_sum'"):
        evaluate(params, [("grpo", batch, 1, {"aggregation": "seq_sum"})])
    with pytest.raises(ValueError, match="loss.aggregation='seq_sum'"):
        evaluate(params, [("gspo", batch, 1, {"aggregation": "seq_sum"})])


def test_ppo_and_gspo_aggregations_through_1_and_4_micro_batches(unigram):
    """PPO aggregates its value and entropy terms as its policy term; GSPO reads its sequence loss as each of
    the response's tokens' (its clip range is 3e-4 / 4e-4: old log-probs within 2e-4 of the policy's)."""
    params = unigram
    batch = make_batch(params)
    near = stand_in_logp(params, batch, T)[0] + 2e-4 * jnp.sign(batch["advantages_BL"])
    gspo_batch = {**batch, "old_logp_BL": near}
    keys = [
        ("ppo", "seq_mean_token_mean", batch),
        ("gspo", "token_mean", gspo_batch),
        ("gspo", "seq_mean_token_sum_norm", gspo_batch),
    ]
    opts = {"ppo": {"entropy_coef": 0.01, "length_norm": 5.0}, "gspo": {"length_norm": 5.0}}
    cases = [
        (name, b, micro, {"aggregation": how, **opts[name]}) for name, how, b in keys for micro in (1, 4)
    ]
    out = evaluate(params, cases)
    for i, (name, how, _) in enumerate(keys):
        same(out[2 * i], out[2 * i + 1], f"{name} {how}")
    # GSPO's per-token reading by hand: token_mean sum_i n_i l_i / N, the norm sum_i n_i l_i / (M 5)
    mask = np.asarray(ppo.rollout_mask(batch))
    n_B, live = mask.sum(1), mask.sum(1) > 0
    logp = np.asarray(stand_in_logp(params, batch, T)[0], np.float64)
    s_B = np.exp(np.where(mask, logp - np.asarray(near), 0.0).sum(1) / np.maximum(n_B, 1))
    adv_B = np.asarray(batch["advantages_BL"])[:, 0]
    l_B = np.maximum(-adv_B * s_B, -adv_B * np.clip(s_B, 1 - 3e-4, 1 + 4e-4))
    np.testing.assert_allclose(out[2][0], np.sum(n_B * l_B) / n_B.sum(), rtol=1e-5)
    np.testing.assert_allclose(out[4][0], np.sum(n_B * l_B) / (live.sum() * 5.0), rtol=1e-5)


def test_the_kl_term_is_the_estimators_over_the_response_tokens(unigram):
    """With zero advantages GRPO's loss is kl_coef x the estimator's term, summed over the response tokens
    and divided by their number: its gradient (the ratio's included, or not) is kl.kl_loss's."""
    params = unigram
    batch = make_batch(params)
    batch["advantages_BL"] = jnp.zeros_like(batch["advantages_BL"])
    mask = ppo.rollout_mask(batch)
    estimators = ("k3", "k2", "k1", "k3_ratio")

    @jax.jit
    def by_hand(p):
        def loss(p, estimator):
            logp = stand_in_logp(p, batch, T)[0]
            term = kl.kl_loss(logp, batch["old_logp_BL"], batch["ref_logp_BL"], estimator)
            return 0.3 * jnp.sum(jnp.where(mask, term, 0.0)) / jnp.sum(mask)

        return [jax.value_and_grad(loss)(p, e) for e in estimators]

    cases = [("grpo", batch, 1, {"kl_coef": 0.3, "kl_estimator": e}) for e in estimators]
    for estimator, (loss, grads, m), (want_loss, want) in zip(
        estimators, evaluate(params, cases), by_hand(params), strict=True
    ):
        np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=estimator)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8, err_msg=estimator)
        assert float(jnp.abs(want["policy"]["w"]).max()) > 1e-3
        assert ("kl_term" in m) == (estimator != "k3")  # k3's value is kl_ref's
    with pytest.raises(ValueError, match="kl_estimator='k4'"):
        evaluate(params, [("grpo", batch, 1, {"kl_estimator": "k4"})])


def test_importance_weights_scale_the_policy_gradient_term_only(unigram):
    """is_weight_BL of 1 changes nothing; 0 on some tokens removes their policy-gradient term (as a zero
    advantage there would) and leaves their KL (GRPO) and value (PPO) terms. GSPO (a ratio per sequence)
    refuses them."""
    params = unigram
    batch = make_batch(params)
    off = np.zeros(batch["old_logp_BL"].shape, bool)
    off[:, 7:] = True  # the later tokens of every row
    variants = [
        batch,
        {**batch, "is_weight_BL": jnp.ones_like(batch["old_logp_BL"])},
        {**batch, "is_weight_BL": jnp.where(off, 0.0, 1.0)},
        {**batch, "advantages_BL": jnp.where(off, 0.0, batch["advantages_BL"])},
    ]
    extra = {"grpo": {"kl_coef": 0.3}, "ppo": {}}
    out = evaluate(params, [(name, b, 1, extra[name]) for name in extra for b in variants])
    for i in range(len(extra)):
        (loss, grads, _), (loss1, grads1, m1), (loss0, grads0, _), (want_loss, want, _) = out[
            4 * i : 4 * i + 4
        ]
        assert float(loss1) == float(loss) and float(m1["is_weight"]) == 1.0
        for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads), strict=True):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(loss0, want_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads0), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)
        g0, g = jax.tree.leaves(grads0), jax.tree.leaves(grads)  # [policy w, value v]
        assert float(jnp.abs(g0[0] - g[0]).max()) > 1e-3  # the policy's gradient changed
        np.testing.assert_array_equal(g0[1], g[1])  # the value's (PPO) did not
    with pytest.raises(ValueError, match="is_weight_BL"):
        evaluate(params, [("gspo", variants[1], 1, {})])


def test_clip_higher_on_hand_made_ratios():
    """DAPO's clip range [1 - 0.2, 1 + 0.28]: a positive advantage stops gaining at r = 1.28, a negative one
    stops losing at r = 0.8; GRPO's options (no clip_low / clip_high) keep the symmetric clip."""
    ratio = np.array([1.25, 1.3, 0.85, 0.75, 1.3, 0.75])
    adv = np.array([1.0, 1.0, -1.0, -1.0, -1.0, 1.0])
    low, high = ppo.clip_range(dapo.OBJECTIVE.options_of(None))
    assert (low, high) == (0.2, 0.28) and ppo.clip_range(grpo.OBJECTIVE.options_of(None)) == (0.2, 0.2)
    loss, clipped = ppo.policy_loss(jnp.log(jnp.asarray(ratio)), jnp.zeros(6), jnp.asarray(adv), low, high)
    np.testing.assert_allclose(loss, [-1.25, -1.28, 0.85, 0.8, 1.3, -0.75], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [False, True, False, True, False, False])
    symmetric, _ = ppo.policy_loss(jnp.log(jnp.asarray(ratio)), jnp.zeros(6), jnp.asarray(adv), 0.2)
    np.testing.assert_allclose(symmetric, [-1.2, -1.2, 0.85, 0.8, 1.3, -0.75], rtol=1e-6)


def test_dr_grpo_and_dapo_declare_the_papers_defaults():
    score = jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    unscaled = grpo.advantages(score, None, None, 4, dr_grpo.OBJECTIVE.options_of(None))
    np.testing.assert_allclose(unscaled, [0.75, -0.25, -0.25, -0.25, 0.25, 0.25, -0.75, 0.25], rtol=1e-6)
    scaled = grpo.advantages(score, None, None, 4, grpo.OBJECTIVE.options_of(None))
    np.testing.assert_allclose(scaled[:4], np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4), rtol=1e-5)
    d, g = dr_grpo.OBJECTIVE.options, dapo.OBJECTIVE.options
    assert (d["std_normalize"], d["aggregation"], d["kl_coef"]) == (False, "seq_mean_token_sum_norm", 0.0)
    assert (g["clip_low"], g["clip_high"], g["kl_coef"], g["aggregation"]) == (0.2, 0.28, 0.0, "token_mean")
    # the existing objectives keep their behaviour: GRPO's k3, token mean, std scaling
    o = grpo.OBJECTIVE.options
    assert (o["kl_estimator"], o["aggregation"], o["std_normalize"]) == ("k3", "token_mean", True)
    c = defaults.load_config("configs/tiny.py:stage=dr_grpo")
    assert c.loss.length_norm == c.rollout.max_new_tokens and c.rollout.samples_per_prompt == 4
