"""Reward-model K-wise ranking loss and DPO: formulas, masking, micro-batch exactness, gradients.

Compiling is most of the cost on CPU, so the tests share a few jitted functions over two fixed batches.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from helpers import rank_batch

from gptjax import model
from gptjax.losses import dpo, logprobs, ranking
from gptjax.train import step

CFG = model.ModelConfig.gpt2(vocab_size=50, d_model=32, n_layers=1, n_heads=2, max_len=32)
RM_CFG = CFG.replace(head="scalar", scalar_head_init="normal")  # random head: rewards differ from the start
apply = jax.jit(model.apply, static_argnums=0)


def perturbed(params, seed, scale):
    """params + scale * N(0, 1) noise (numpy noise: no per-shape compiles)."""
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + scale * r.standard_normal(x.shape, np.float32), params)


@pytest.fixture(scope="module")
def lm_params():
    return model.init(CFG, jax.random.key(0))  # the one init (compiling it is slow): the others derive


@pytest.fixture(scope="module")
def rm_params(lm_params):
    # The LM body plus a random scalar head, as model.init(RM_CFG) would lay it out.
    head = np.random.default_rng(5).standard_normal(CFG.d_model, np.float32) / math.sqrt(CFG.d_model)
    params = {
        **perturbed(lm_params, 1, 0.05),
        "value_head": jnp.asarray(head),
        "value_bias": jnp.float32(0.1),
    }
    want = model.param_shapes(RM_CFG)
    assert jax.tree.structure(params) == jax.tree.structure(want)
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, want)
    return params


@pytest.fixture(scope="module")
def policy_and_ref(lm_params):
    # Larger weights than the init so log-probs (and policy/ref differences) are far from uniform.
    policy = perturbed(lm_params, 2, 0.2)
    return policy, perturbed(policy, 3, 0.1)


def ctx_of(cfg=RM_CFG, ref=None, **loss_cfg):
    frozen, frozen_cfgs = ({"ref": ref}, (("ref", CFG),)) if ref is not None else ({}, ())
    return step.Ctx(
        model_cfg=cfg,
        loss_cfg=ml_collections.FrozenConfigDict(loss_cfg),
        frozen=frozen,
        frozen_cfgs=frozen_cfgs,
    )


def seq_of(batch):
    return batch["tokens_BKL"], batch["prompt_lengths_BK"], batch["lengths_BK"]


# Prompts with 4, 2, 3, 1, 0, 4, 2, 3 valid responses: micro-batches (rows i, i+4) differ in denominators.
RM_BATCH = rank_batch([4, 2, 3, 1, 0, 4, 2, 3], K=4, seed=1, vocab=CFG.vocab_size)
RM_CTX = ctx_of(margin=0.3, center_coef=0.1)
DPO_BATCH = rank_batch([3, 2], K=3, seed=7, vocab=CFG.vocab_size)  # the second prompt has a single pair
DPO_BETA = 0.3


@jax.jit
def rm_forward(params, batch):
    loss_sum, metrics = ranking.loss_fn(params, batch, jax.random.key(1), RM_CTX)
    return loss_sum, metrics, ranking.rewards(params, batch, RM_CTX)


@functools.partial(jax.jit, static_argnums=2)
def rm_grads(params, batch, micro_batches):
    """Gradient of the mean loss (summed grads / summed count), as the train step takes it."""
    grads, metrics = step.grads_and_metrics(
        ranking.loss_fn, params, batch, jax.random.key(0), RM_CTX, micro_batches
    )
    return jax.tree.map(lambda g: g / metrics["loss"][1], grads), step.reduce_metrics(metrics)


@functools.partial(jax.jit, static_argnames="label_smoothing")
def dpo_forward(policy, ref, batch, label_smoothing=0.0):
    ctx = ctx_of(CFG, ref, beta=DPO_BETA, label_smoothing=label_smoothing)
    return dpo.loss_fn(policy, batch, jax.random.key(0), ctx)


seq_logprobs = jax.jit(logprobs.sequence_logprobs, static_argnums=0)
resp_logprobs = jax.jit(logprobs.response_logprobs, static_argnums=0, static_argnames="temperature")


def loop_kwise(rewards, valid, margin):
    """The InstructGPT loss written out pair by pair."""
    total, prompts = 0.0, 0
    for r_K, v_K in zip(rewards, valid, strict=True):
        terms = [
            math.log1p(math.exp(-(r_K[i] - r_K[j] - margin)))
            for i, j in itertools.combinations(range(len(r_K)), 2)
            if v_K[i] and v_K[j]
        ]
        if terms:
            total += sum(terms) / len(terms)
            prompts += 1
    return total, prompts


def rel_err(a, b):
    a, b = np.ravel(np.asarray(a, np.float64)), np.ravel(np.asarray(b, np.float64))
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12))


def flat(tree):
    return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


# ---------------------------------------------------------------- K-wise ranking loss


@pytest.mark.parametrize("K", [2, 5])
@pytest.mark.parametrize("margin", [0.0, 0.7])
def test_kwise_loss_matches_double_loop(K, margin):
    r = np.random.default_rng(K)
    rewards = r.normal(size=(8, K)).astype(np.float32) * 2
    valid = r.random((8, K)) > 0.3
    valid[0] = False
    valid[1] = False
    valid[1, K - 1] = True  # one valid response: no pair, the prompt is not counted
    valid[2] = True
    loss_sum, count = ranking.kwise_loss(jnp.asarray(rewards), jnp.asarray(valid), margin)
    want_sum, want_count = loop_kwise(rewards, valid, margin)
    assert float(count) == want_count
    assert want_count >= 2
    np.testing.assert_allclose(float(loss_sum), want_sum, rtol=1e-5)


def test_kwise_loss_jits_and_is_stable_for_large_gaps():
    rewards = jnp.array([[60.0, -60.0], [-60.0, 60.0]])
    loss_sum, count = jax.jit(ranking.kwise_loss)(rewards, jnp.ones((2, 2), bool))
    # first prompt ~ 0, second ~ 120 (a naive log(sigmoid(x)) gives inf here)
    np.testing.assert_allclose(float(loss_sum), 120.0, rtol=1e-5)
    assert float(count) == 2


def test_masked_responses_contribute_nothing():
    r = np.random.default_rng(0)
    rewards = jnp.asarray(r.normal(size=(4, 5)), jnp.float32)
    valid_np = r.random((4, 5)) > 0.4
    valid_np[0, :2], valid_np[1, 3] = True, False
    valid = jnp.asarray(valid_np)

    def loss(x):
        s, c = ranking.kwise_loss(x, valid, 0.3)
        return s / c

    l1, g1 = jax.value_and_grad(loss)(rewards)
    for junk in (jnp.asarray(r.normal(size=(4, 5)) * 100, jnp.float32), jnp.full((4, 5), jnp.nan)):
        l2, g2 = jax.value_and_grad(loss)(jnp.where(valid, rewards, junk))
        assert float(l1) == float(l2)
        np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))
    assert not np.any(np.asarray(g1)[~valid_np])
    assert np.all(np.asarray(g1)[0, :2] != 0)


# ---------------------------------------------------------------- reward model loss_fn


def test_rm_loss_fn_values_and_metrics(rm_params):
    loss_sum, m, r = rm_forward(rm_params, RM_BATCH)
    r = np.asarray(r, np.float64)
    valid = RM_BATCH["valid_BK"]
    assert np.all(r[~valid] == 0) and np.all(np.isfinite(r))
    assert np.std(r[valid]) > 1e-2

    want, prompts = loop_kwise(r, valid, 0.3)
    counted = [b for b in range(len(valid)) if valid[b].sum() >= 2]
    center = sum(np.mean(r[b][valid[b]] ** 2) for b in counted)
    np.testing.assert_allclose(float(loss_sum), want + 0.1 * center, rtol=1e-5)
    assert float(m["loss"][0]) == float(loss_sum) and float(m["loss"][1]) == prompts == len(counted) == 6

    pairs = [
        (b, i, j)
        for b in range(len(valid))
        for i, j in itertools.combinations(range(4), 2)
        if valid[b, i] & valid[b, j]
    ]
    assert float(m["accuracy"][1]) == float(m["margin_mean"][1]) == len(pairs) == 2 * (6 + 1 + 3)
    assert float(m["accuracy"][0]) == sum(r[b, i] > r[b, j] for b, i, j in pairs)
    np.testing.assert_allclose(
        float(m["margin_mean"][0]), sum(r[b, i] - r[b, j] for b, i, j in pairs), rtol=1e-5, atol=1e-5
    )
    assert float(m["reward_mean"][1]) == float(m["reward_sq"][1]) == valid.sum()
    np.testing.assert_allclose(float(m["reward_mean"][0]), r[valid].sum(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(m["reward_sq"][0]), (r[valid] ** 2).sum(), rtol=1e-5)


def test_rm_same_gradient_through_1_and_4_micro_batches(rm_params):
    g1, m1 = rm_grads(rm_params, RM_BATCH, 1)
    g4, m4 = rm_grads(rm_params, RM_BATCH, 4)
    assert float(m1["loss"]) > 0
    for k in m1:
        np.testing.assert_allclose(float(m4[k]), float(m1[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    assert float(jnp.linalg.norm(flat(g1))) > 1e-3
    assert rel_err(flat(g4), flat(g1)) <= 1e-5


def test_rm_finite_difference_gradient(rm_params):
    grads, _ = rm_grads(rm_params, RM_BATCH, 1)

    def loss(params):
        loss_sum, m, _ = rm_forward(params, RM_BATCH)
        return float(loss_sum) / float(m["loss"][1])

    # Along a random unit direction through every parameter; float32, so central differences and a
    # tolerance well above their error but far below that of a wrong gradient.
    direction = perturbed(jax.tree.map(jnp.zeros_like, rm_params), 4, 1.0)
    direction = jax.tree.map(lambda d: d / jnp.linalg.norm(flat(direction)), direction)
    analytic = float(jnp.dot(flat(grads), flat(direction)))
    eps = 1e-2
    plus = loss(jax.tree.map(lambda x, d: x + eps * d, rm_params, direction))
    minus = loss(jax.tree.map(lambda x, d: x - eps * d, rm_params, direction))
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic) > 1e-3
    np.testing.assert_allclose(numeric, analytic, rtol=2e-2)


def test_reward_at_last_and_mean(monkeypatch):
    # values = 10 * token + position, so the value read shows exactly which position was used
    def fake_apply(cfg, params, tokens_NL, **kw):
        return 10.0 * tokens_NL + jnp.arange(tokens_NL.shape[1], dtype=jnp.float32)

    monkeypatch.setattr(model, "apply", fake_apply)
    batch = {
        "tokens_BKL": jnp.array([[[1, 2, 3, 4, 5, 0, 0, 0], [1, 2, 7, 0, 0, 0, 0, 0], [0] * 8]], jnp.int32),
        "lengths_BK": jnp.array([[5, 3, 0]], jnp.int32),
        "prompt_lengths_BK": jnp.array([[2, 2, 0]], jnp.int32),
        "valid_BK": jnp.array([[True, True, False]]),
    }
    last = ranking.rewards(None, batch, ctx_of())  # reward_at missing from the config: 'last'
    np.testing.assert_allclose(np.asarray(last), [[50 + 4, 70 + 2, 0]])
    mean = ranking.rewards(None, batch, ctx_of(reward_at="mean"))
    np.testing.assert_allclose(np.asarray(mean), [[(32 + 43 + 54) / 3, 72, 0]], rtol=1e-6)
    with pytest.raises(ValueError):
        ranking.rewards(None, batch, ctx_of(reward_at="first"))


def test_rewards_equal_a_separate_forward_of_each_response(rm_params):
    _, _, r = rm_forward(rm_params, RM_BATCH)
    r = np.asarray(r)
    junk = np.random.default_rng(4).integers(1, CFG.vocab_size, RM_BATCH["tokens_BKL"].shape[-1])
    for b, k in zip(*np.nonzero(RM_BATCH["valid_BK"]), strict=True):
        n = RM_BATCH["lengths_BK"][b, k]
        # Alone, and with junk instead of padding after the EOS: causal, so the value at the EOS is the same.
        tokens = np.concatenate([RM_BATCH["tokens_BKL"][b, k, :n], junk[n:]])[None]
        values = apply(RM_CFG, rm_params, jnp.asarray(tokens))
        np.testing.assert_allclose(r[b, k], float(values[0, n - 1]), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- DPO


def test_dpo_loss_known_values():
    pi_c, pi_r = jnp.array([-1.0, -3.0, -2.0]), jnp.array([-2.0, -1.0, -2.0])
    ref_c, ref_r = jnp.array([-1.5, -2.0, -4.0]), jnp.array([-1.5, -2.0, -1.0])
    # log-ratio differences: (0.5 - -0.5) = 1, (-1 - 1) = -2, (2 - -1) = 3
    for beta in (0.1, 0.5):
        want = [math.log1p(math.exp(-beta * x)) for x in (1.0, -2.0, 3.0)]
        np.testing.assert_allclose(np.asarray(dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)), want, rtol=1e-6)
    # conservative DPO: (1 - eps) * loss(x) + eps * loss(-x)
    x, eps = 0.5 * 3.0, 0.2
    want = (1 - eps) * math.log1p(math.exp(-x)) + eps * math.log1p(math.exp(x))
    got = dpo.dpo_loss(pi_c[2], pi_r[2], ref_c[2], ref_r[2], 0.5, label_smoothing=eps)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    # identical policy and reference: log 2 whatever beta
    np.testing.assert_allclose(
        np.asarray(dpo.dpo_loss(pi_c, pi_r, pi_c, pi_r, 3.0)), [math.log(2)] * 3, rtol=1e-6
    )


def test_sequence_logprobs_matches_explicit_loop(policy_and_ref):
    params, _ = policy_and_ref
    got = np.asarray(seq_logprobs(CFG, params, *seq_of(DPO_BATCH)))
    B, K, _ = DPO_BATCH["tokens_BKL"].shape
    for b, k in itertools.product(range(B), range(K)):
        tokens = DPO_BATCH["tokens_BKL"][b, k]
        p, n = DPO_BATCH["prompt_lengths_BK"][b, k], DPO_BATCH["lengths_BK"][b, k]
        logits = np.asarray(apply(CFG, params, jnp.asarray(tokens[None])), np.float64)[0]
        want = 0.0
        for t in range(p, n):  # token t (the response, then its EOS) is predicted by the logits at t - 1
            row = logits[t - 1]
            want += row[tokens[t]] - (row.max() + np.log(np.exp(row - row.max()).sum()))
        np.testing.assert_allclose(got[b, k], want, rtol=1e-5, atol=1e-5, err_msg=f"{b},{k}")
    assert np.all(got[~DPO_BATCH["valid_BK"]] == 0)
    assert np.all(got[DPO_BATCH["valid_BK"]] < -1)


def test_response_logprobs_is_aligned_with_tokens_and_takes_any_leading_shape(policy_and_ref):
    params, _ = policy_and_ref
    tokens_KL, prompt_lengths_K, lengths_K = (x[0] for x in seq_of(DPO_BATCH))  # [K, L]: rollout-shaped
    logp_KL, mask_KL = resp_logprobs(CFG, params, tokens_KL, prompt_lengths_K, lengths_K)
    p, n = int(prompt_lengths_K[0]), int(lengths_K[0])
    assert np.asarray(mask_KL[0]).tolist() == [p <= t < n for t in range(tokens_KL.shape[1])]
    logits = apply(CFG, params, jnp.asarray(tokens_KL[:1]))
    for t in (p, n - 1):
        want = jax.nn.log_softmax(logits[0, t - 1])[tokens_KL[0, t]]
        np.testing.assert_allclose(float(logp_KL[0, t]), float(want), rtol=1e-5)
    assert np.all(np.asarray(logp_KL)[~np.asarray(mask_KL)] == 0)
    hot, _ = resp_logprobs(CFG, params, tokens_KL, prompt_lengths_K, lengths_K, temperature=2.0)
    want = jax.nn.log_softmax(logits[0, p - 1] / 2.0)[tokens_KL[0, p]]
    np.testing.assert_allclose(float(hot[0, p]), float(want), rtol=1e-5)


def test_dpo_loss_fn_k3_is_mean_over_pairs(policy_and_ref):
    policy, ref = policy_and_ref
    beta = DPO_BETA
    loss_sum, m = dpo_forward(policy, ref, DPO_BATCH)
    pi = np.asarray(seq_logprobs(CFG, policy, *seq_of(DPO_BATCH)), np.float64)
    rf = np.asarray(seq_logprobs(CFG, ref, *seq_of(DPO_BATCH)), np.float64)
    h = {
        (b, i, j): beta * ((pi[b, i] - rf[b, i]) - (pi[b, j] - rf[b, j]))
        for b, i, j in [(0, 0, 1), (0, 0, 2), (0, 1, 2), (1, 0, 1)]
    }
    assert min(abs(x) for x in h.values()) > 1e-3  # policy and ref really differ
    nll = {key: math.log1p(math.exp(-x)) for key, x in h.items()}
    want = (nll[0, 0, 1] + nll[0, 0, 2] + nll[0, 1, 2]) / 3 + nll[1, 0, 1]  # each prompt weighted once
    np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)
    assert float(m["loss"][1]) == 2
    assert float(m["margin"][1]) == float(m["accuracy"][1]) == 4
    np.testing.assert_allclose(float(m["margin"][0]), sum(h.values()), rtol=1e-4)
    assert float(m["accuracy"][0]) == sum(x > 0 for x in h.values())
    chosen = sum(beta * (pi[b, i] - rf[b, i]) for b, i, _ in h)
    rejected = sum(beta * (pi[b, j] - rf[b, j]) for b, _, j in h)
    np.testing.assert_allclose(float(m["chosen_reward"][0]), chosen, rtol=1e-4)
    np.testing.assert_allclose(float(m["rejected_reward"][0]), rejected, rtol=1e-4)

    smooth, _ = dpo_forward(policy, ref, DPO_BATCH, label_smoothing=0.1)
    nll_s = {k: 0.9 * v + 0.1 * math.log1p(math.exp(h[k])) for k, v in nll.items()}
    want_s = (nll_s[0, 0, 1] + nll_s[0, 0, 2] + nll_s[0, 1, 2]) / 3 + nll_s[1, 0, 1]
    np.testing.assert_allclose(float(smooth), want_s, rtol=1e-5)


def test_dpo_policy_equal_to_ref_gives_log2_and_ties_are_not_correct(policy_and_ref):
    policy, _ = policy_and_ref
    _, m = dpo_forward(policy, policy, DPO_BATCH)
    reduced = step.reduce_metrics(m)
    np.testing.assert_allclose(float(reduced["loss"]), math.log(2), rtol=1e-6)
    assert float(reduced["accuracy"]) == 0.0  # every pair is a tie, and a tie is not a win
    assert float(reduced["margin"]) == 0.0


def test_dpo_reference_gets_no_gradient(policy_and_ref):
    policy, ref = policy_and_ref
    g_ref = jax.jit(jax.grad(lambda r: dpo_forward(policy, r, DPO_BATCH)[0]))(ref)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_ref))


def test_short_dpo_run_raises_held_out_margin(policy_and_ref):
    # Chosen responses repeat token 7, rejected ones token 9; the held-out prompts are unseen.
    def pairs(seed, B):
        r = np.random.default_rng(seed)
        tokens = np.zeros((B, 2, 12), np.int32)
        for b in range(B):
            tokens[b, :, :4] = r.integers(10, CFG.vocab_size, 4)
            tokens[b, 0, 4:8], tokens[b, 1, 4:8] = 7, 9
            tokens[b, :, 8] = 1  # EOS
        full = np.ones((B, 2), np.int32)
        return {
            "tokens_BKL": tokens,
            "lengths_BK": 9 * full,
            "prompt_lengths_BK": 4 * full,
            "valid_BK": full > 0,
        }

    train, held_out = pairs(0, 8), pairs(1, 8)
    ref, _ = policy_and_ref
    ctx = ctx_of(CFG, ref, beta=0.1)
    opt = optax.adam(3e-3)

    @jax.jit
    def update(params, opt_state):
        grads, metrics = step.grads_and_metrics(dpo.loss_fn, params, train, jax.random.key(0), ctx)
        grads = jax.tree.map(lambda g: g / metrics["loss"][1], grads)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def held_out_margin(params):
        return float(step.reduce_metrics(dpo_forward(params, ref, held_out)[1])["margin"])

    params, opt_state = ref, opt.init(ref)
    assert held_out_margin(params) == 0.0
    for _ in range(15):
        params, opt_state = update(params, opt_state)
    assert held_out_margin(params) > 0.1
