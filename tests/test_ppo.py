"""PPO: KL estimators, GAE, the clipped losses, the KL controller, micro-batch exactness, the rollout layout,
the experience's reward placement, and a tiny PPO-ptx run that checkpoints inside a rollout and resumes."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_same_models, killed_after, rl_model_cfg
from ml_collections import FrozenConfigDict

from gptjax import checkpoint, losses, model, rl, train
from gptjax.losses import logprobs, ppo
from gptjax.model import sample, sharding
from gptjax.train import defaults
from gptjax.train import step as step_lib

# --------------------------------------------------------------------------------------------------
# KL estimators, GAE, whitening, the KL controller


def test_kl_estimators_match_their_formulas():
    logp = jnp.array([[-1.0, -0.2, -3.0]])
    ref = jnp.array([[-1.5, -0.2, -1.0]])
    log_r = np.array([0.5, 0.0, -2.0])
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k1")[0], log_r, rtol=1e-6)
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k2")[0], 0.5 * log_r**2, rtol=1e-6)
    k3 = np.exp(-log_r) - 1 + log_r
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k3")[0], k3, rtol=1e-6)
    assert float(rl.kl_penalty(logp, ref, "k3")[0, 1]) == 0.0
    with pytest.raises(ValueError, match="k1"):
        rl.kl_penalty(logp, ref, "k4")


def test_kl_estimators_average_to_the_true_kl():
    """Sampled from pi, k1 and k3 are unbiased for KL(pi || ref); k2 is close for nearby distributions."""
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.4, 0.4, 0.2])
    true_kl = float(np.sum(p * np.log(p / q)))
    x = jax.random.choice(jax.random.key(0), 3, (200_000,), p=jnp.asarray(p))
    logp, logq = jnp.log(jnp.asarray(p))[x], jnp.log(jnp.asarray(q))[x]
    for kind in ("k1", "k3"):
        assert abs(float(jnp.mean(rl.kl_penalty(logp, logq, kind))) - true_kl) < 2e-3, kind
    assert abs(float(jnp.mean(rl.kl_penalty(logp, logq, "k2"))) - true_kl) < 5e-3


def gae_reference(rewards, values, mask, gamma, lam):
    """Plain-Python GAE: the next step is the next masked position; the episode ends after the last one."""
    B, T = rewards.shape
    adv, ret = np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        steps = [t for t in range(T) if mask[b, t]]
        last_adv, next_v = 0.0, 0.0
        for t in reversed(steps):
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last_adv = delta + gamma * lam * last_adv
            adv[b, t], ret[b, t] = last_adv, last_adv + values[b, t]
            next_v = values[b, t]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (1.0, 1.0)])
def test_gae_matches_a_python_loop_with_masks(gamma, lam):
    rng = np.random.default_rng(0)
    B, T = 4, 9
    rewards = rng.normal(size=(B, T))
    values = rng.normal(size=(B, T))
    mask = np.zeros((B, T), bool)
    mask[0, 2:7] = True  # a response after a prompt
    mask[1, :] = True
    mask[2, [1, 2, 5, 6, 8]] = True  # holes (e.g. tool output) are skipped, not episode ends
    # row 3: nothing to learn from
    adv, ret = rl.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    want_adv, want_ret = gae_reference(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_gae_known_values():
    """gamma = lam = 1, zero values: every step's advantage is the reward still to come."""
    rewards = jnp.array([[0.0, 0.0, 1.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    adv, ret = rl.gae(rewards, jnp.zeros((1, 4)), mask, 1.0, 1.0)
    np.testing.assert_allclose(adv[0], [1.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(ret[0], [1.0, 1.0, 1.0, 0.0])


def test_whiten_over_the_mask_only():
    x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
    mask = jnp.array([[True, True, True, False]])
    out = rl.whiten(x, mask)
    np.testing.assert_allclose(out[0, :3], np.array([-1.0, 0.0, 1.0]) / np.sqrt(2 / 3), rtol=1e-5)
    assert float(out[0, 3]) == 0.0
    np.testing.assert_allclose(rl.whiten(x, mask, shift_mean=False)[0, :3], out[0, :3] + 2.0, rtol=1e-5)


def test_adaptive_kl_controller_update_rule():
    # Ziegler et al.: e = clip(kl / target - 1, -0.2, 0.2); coef *= 1 + e * n / horizon
    assert rl.adaptive_kl_coef(0.1, kl=6.6, target=6.0, horizon=10000, n_steps=512) == pytest.approx(
        0.1 * (1 + 0.1 * 512 / 10000)
    )
    assert rl.adaptive_kl_coef(0.1, kl=60.0, target=6.0, horizon=10000, n_steps=512) == pytest.approx(
        0.1 * (1 + 0.2 * 512 / 10000)
    )
    assert rl.adaptive_kl_coef(0.1, kl=0.0, target=6.0, horizon=1000, n_steps=100) == pytest.approx(
        0.1 * (1 - 0.2 * 0.1)
    )
    assert rl.adaptive_kl_coef(0.1, kl=6.0, target=6.0, horizon=1000, n_steps=100) == pytest.approx(0.1)


# --------------------------------------------------------------------------------------------------
# The clipped losses


def test_policy_loss_clipping_regions():
    eps = 0.2
    ratio = jnp.array([1.1, 1.5, 0.5, 1.5, 0.5, 0.9])
    adv = jnp.array([1.0, 1.0, 1.0, -1.0, -1.0, -2.0])
    old = jnp.zeros(6)
    loss, clipped = ppo.policy_loss(jnp.log(ratio), old, adv, eps)
    # A > 0: the gain stops at 1 + eps (clipped), a ratio below 1 - eps keeps the (worse) unclipped value;
    # A < 0: the mirror image.
    np.testing.assert_allclose(loss, [-1.1, -1.2, -0.5, 1.5, 0.8, 1.8], rtol=1e-6)
    np.testing.assert_array_equal(clipped, [False, True, False, False, True, False])
    grad = jax.grad(lambda lp: jnp.sum(ppo.policy_loss(lp, old, adv, eps)[0]))(jnp.log(ratio))
    # d/dlogp of -A * r is -A * r; zero where clipped
    np.testing.assert_allclose(grad, [-1.1, 0.0, -0.5, 1.5, 0.0, 1.8], rtol=1e-6)


def test_value_loss_clipping():
    old = jnp.zeros(4)
    ret = jnp.ones(4)
    v = jnp.array([0.5, 0.1, -0.5, 1.0])
    loss, clipped = ppo.value_loss(v, old, ret, 0.2)
    # v=0.5 moved past old+0.2: the clipped value 0.2 is further from the return -> counts
    np.testing.assert_allclose(loss, 0.5 * np.array([0.64, 0.81, 2.25, 0.64]), rtol=1e-6)
    np.testing.assert_array_equal(clipped, [True, False, False, True])
    plain, none = ppo.value_loss(v, old, ret, 0.0)
    np.testing.assert_allclose(plain, 0.5 * (np.asarray(v) - 1) ** 2, rtol=1e-6)
    assert not bool(jnp.any(none))


# --------------------------------------------------------------------------------------------------
# Models and a synthetic rollout batch


tiny_cfg = rl_model_cfg


def synthetic_batch(rng, B=8, L=20, ptx=0):
    r = np.random.default_rng(rng)
    prompt_lengths = r.integers(2, 8, B)
    lengths = prompt_lengths + r.integers(1, L - 8, B)
    batch = {
        "tokens_BL": r.integers(0, 259, (B, L)).astype(np.int32),
        "prompt_lengths_B": prompt_lengths.astype(np.int32),
        "lengths_B": lengths.astype(np.int32),
        "old_logp_BL": (-r.uniform(0.5, 3, (B, L))).astype(np.float32),
        "old_values_BL": r.normal(size=(B, L)).astype(np.float32),
        "advantages_BL": r.normal(size=(B, L)).astype(np.float32),
        "returns_BL": r.normal(size=(B, L)).astype(np.float32),
    }
    if ptx:
        batch["ptx_inputs_BL"] = r.integers(0, 259, (ptx, 16)).astype(np.int32)
        batch["ptx_targets_BL"] = r.integers(0, 259, (ptx, 16)).astype(np.int32)
        batch["ptx_weights_BL"] = (r.uniform(size=(ptx, 16)) < 0.8).astype(np.float32)
    return batch


def ppo_ctx(policy_cfg, value_cfg, **loss):
    opts = {**dict(losses.objective("ppo").options), **loss}
    return step_lib.Ctx(
        model_cfg=policy_cfg,
        loss_cfg=FrozenConfigDict(opts),
        role_cfgs=(("policy", policy_cfg), ("value", value_cfg)),
        scalars={"temperature": jnp.float32(0.7)},
    )


def test_one_or_four_micro_batches_give_the_same_ppo_gradient_ptx_included():
    pcfg, vcfg = tiny_cfg(), tiny_cfg("scalar")
    params = {"policy": model.init(pcfg, jax.random.key(0)), "value": model.init(vcfg, jax.random.key(1))}
    batch = jax.tree.map(jnp.asarray, synthetic_batch(0, B=8, ptx=16))
    ctx = ppo_ctx(pcfg, vcfg, ptx_coef=2.0, entropy_coef=0.01)

    def grads(ctx, micro):
        c = step_lib.with_denominators(ctx, batch, ppo.denominators)
        g, m = step_lib.grads_and_metrics(ppo.loss_fn, params, batch, jax.random.key(0), c, micro)
        count = m["loss"][1]
        return jax.tree.map(lambda x: x / count, g), step_lib.reduce_metrics(m)

    grads = jax.jit(grads, static_argnums=1)
    g1, m1 = grads(ctx, 1)
    g4, m4 = grads(ctx, 4)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    for k in ("loss", "policy_loss", "value_loss", "ptx_loss", "entropy"):
        np.testing.assert_allclose(m1[k], m4[k], rtol=1e-5)
    assert float(m1["ptx_loss"]) > 1.0  # untrained: a real cross-entropy
    # the ptx term moves the policy: without it the gradient differs
    g0, _ = grads(ppo_ctx(pcfg, vcfg, ptx_coef=0.0, entropy_coef=0.01), 1)
    diff = optax.tree.norm(jax.tree.map(jnp.subtract, g0["policy"], g1["policy"]))
    assert float(diff) > 0.1 * float(optax.tree.norm(g1["policy"]))


def test_ppo_loss_at_the_old_policy_is_minus_the_mean_advantage():
    """At ratio 1 the clipped surrogate is -A per token; the policy gradient is -A d logp."""
    pcfg, vcfg = tiny_cfg(), tiny_cfg("scalar")
    params = {"policy": model.init(pcfg, jax.random.key(0)), "value": model.init(vcfg, jax.random.key(1))}
    batch = synthetic_batch(1, B=4)
    ctx = ppo_ctx(pcfg, vcfg, vf_coef=0.0)
    logp, _ = ppo.policy_terms(pcfg, params["policy"], batch, 0.7)
    batch["old_logp_BL"] = np.asarray(logp)
    ctx = step_lib.with_denominators(ctx, batch, ppo.denominators)
    _, m = ppo.loss_fn(params, batch, None, ctx)
    mask = np.asarray(ppo.rollout_mask(batch))
    want = -np.sum(batch["advantages_BL"] * mask) / mask.sum()
    np.testing.assert_allclose(m["policy_loss"][0] / m["policy_loss"][1], want, rtol=1e-5)
    assert float(m["policy_clipfrac"][0]) == 0.0
    assert abs(float(m["approx_kl"][0])) < 1e-6


# --------------------------------------------------------------------------------------------------
# Experience and the rollout layout


def test_experience_puts_the_score_on_the_last_token_and_penalises_a_missing_eos():
    """Zero value head, constant reward 0.7, no KL, gamma = lam = 1, no whitening: every response token's
    advantage and return is its response's score (0.7, or 0.7 - 0.5 without EOS)."""
    pcfg, vcfg = tiny_cfg(), tiny_cfg("scalar")
    policy = model.init(pcfg, jax.random.key(0))
    value = model.init(vcfg, jax.random.key(1))
    value = {**value, "value_head": jnp.zeros_like(value["value_head"]), "value_bias": jnp.zeros(())}
    reward = {**value, "value_bias": jnp.asarray(0.7)}
    params = {"policy": policy, "value": value, "ref": policy, "reward": reward}
    cfgs = {"policy": pcfg, "value": vcfg, "ref": pcfg, "reward": vcfg}
    opts = FrozenConfigDict(
        {
            **defaults.rollout_section().to_dict(),
            "lam": 1.0,
            "whiten_advantages": False,
            "missing_eos_penalty": 0.5,
        }
    )
    tokens = jax.random.randint(jax.random.key(2), (3, 12), 0, 259)
    prompt_lengths = jnp.array([3, 5, 2])
    lengths = jnp.array([7, 12, 4])
    ended = jnp.array([True, False, True])
    exp = rl.experience(params, cfgs, tokens, prompt_lengths, lengths, ended, 0.3, 1.0, opts)
    mask = np.asarray(logprobs.response_mask(prompt_lengths, lengths, 12))
    score = np.array([0.7, 0.2, 0.7])[:, None]
    np.testing.assert_allclose(exp["advantages_BL"], np.where(mask, score, 0.0), atol=1e-5)
    np.testing.assert_allclose(exp["returns_BL"], np.where(mask, score, 0.0), atol=1e-5)
    np.testing.assert_allclose(exp["stats"]["score_B"], 0.7, rtol=1e-6)
    np.testing.assert_allclose(exp["stats"]["kl_B"], 0.0, atol=1e-6)  # ref == policy
    # the old log-probs are the policy's, at the temperature
    want, _ = logprobs.response_logprobs(pcfg, policy, tokens, prompt_lengths, lengths)
    np.testing.assert_allclose(exp["old_logp_BL"], want, rtol=1e-5, atol=1e-5)


def test_scoring_in_row_chunks_matches_one_pass_on_a_data_parallel_batch():
    """rl.score over 8-device-sharded rows, 2 chunks of 8 (strided, so each chunk keeps the split) gives the
    one-pass numbers row for row; the auto chunk size keeps a chunk's logits under the budget."""
    pcfg, vcfg = tiny_cfg(), tiny_cfg("scalar")
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    policy, value = model.init(pcfg, jax.random.key(0), mesh), model.init(vcfg, jax.random.key(1), mesh)
    ref = model.init(pcfg, jax.random.key(3), mesh)
    params = {"policy": policy, "value": value, "ref": ref, "reward": value}
    cfgs = {"policy": pcfg, "value": vcfg, "ref": pcfg, "reward": vcfg}
    rng = np.random.default_rng(0)
    batch = sharding.shard_batch(
        {
            "tokens_BL": rng.integers(0, 259, (16, 12)).astype(np.int32),
            "prompt_lengths_B": rng.integers(1, 6, 16).astype(np.int32),
            "lengths_B": rng.integers(7, 13, 16).astype(np.int32),
        },
        mesh,
    )
    args = (batch["tokens_BL"], batch["prompt_lengths_B"], batch["lengths_B"], 0.7)
    whole = jax.jit(lambda p: rl.score(p, cfgs, *args))(params)
    chunked = jax.jit(lambda p: rl.score(p, cfgs, *args, chunk_rows=8))(params)
    for k in whole:
        np.testing.assert_allclose(np.asarray(chunked[k]), np.asarray(whole[k]), rtol=2e-5, atol=2e-5)
    assert float(np.abs(np.asarray(whole["logp"])).sum()) > 0 and np.asarray(whole["mask"]).any()
    # 128 rows of 512 x 50272 fp32 logits (103 MB a row) in chunks under 2 GiB, on 1 or 8 devices
    assert rl.score_chunk_rows(128, 512 * 50272 * 4) == 16
    assert rl.score_chunk_rows(512, 512 * 50272 * 4, devices=8) == 16
    assert rl.score_chunk_rows(64, 32 * 288 * 4) == 64  # small batches: one pass
    assert rl.score_chunk_rows(24, 10**12, devices=8) == 8  # nothing fits: the smallest even split


def test_kv_cache_generation_under_the_rollout_layout_matches_a_full_forward_pass():
    """Decode with tensor-parallel weights (the rollout layout) and recompute with FSDP (training's): the
    sampled tokens' log-probs agree."""
    cfg = tiny_cfg()
    train_mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    rollout_mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    params = model.init(cfg, jax.random.key(3), train_mesh)
    moved = jax.device_put(params, model.param_shardings(cfg, rollout_mesh))
    assert moved["blocks"]["attn"]["wq"].sharding.spec != params["blocks"]["attn"]["wq"].sharding.spec
    prompts = np.random.default_rng(0).integers(0, 259, (8, 6)).astype(np.int32)
    plen = np.array([6, 3, 4, 1, 6, 2, 5, 6], np.int32)
    put = lambda x: jax.device_put(x, jax.sharding.NamedSharding(rollout_mesh, sharding.batch_spec(x.ndim)))
    with jax.set_mesh(rollout_mesh):
        out = sample.generate(
            cfg,
            moved,
            put(prompts),
            jax.random.key(4),
            max_new_tokens=10,
            prompt_lengths_B=put(plen),
            temperature=0.8,
            eos_id=258,
            return_info=True,
        )
    out = jax.device_get(out)  # back to the host, as the rollout source does
    tokens, _ = sample.concat_prompt_response(prompts, plen, out.tokens_BT, out.lengths_B)
    tokens = jax.device_put(
        np.asarray(tokens), jax.sharding.NamedSharding(train_mesh, sharding.batch_spec(2))
    )
    with jax.set_mesh(train_mesh):
        logp, mask = jax.jit(logprobs.response_logprobs, static_argnums=0)(
            cfg, params, tokens, plen, plen + out.lengths_B, temperature=0.8
        )
    full = np.asarray(logp)[np.asarray(mask)]
    cached = np.asarray(out.logprobs_BT)[np.asarray(out.mask_BT).astype(bool)]
    np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)


def test_rollout_generates_in_calls_of_generate_rows_with_the_policy_moved_in_its_compute_dtype():
    """rollout.generate_rows=4 of 8 prompts: two generate calls (keys fold_in(rollout key, i)) whose rows
    are joined in order; the policy reaches the rollout layout already cast to bf16 (no fp32 copy there)."""
    from gptjax.rl import rollout

    cfg = tiny_cfg(dtype="bfloat16")
    train_mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    rollout_mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    params = model.init(cfg, jax.random.key(3), train_mesh)
    config = defaults.load_config("configs/tiny.py:stage=ppo")
    config.unlock()
    config.rollout.update(temperature=0.8, max_new_tokens=10, generate_rows=4)
    src = rollout.RolloutSource.__new__(rollout.RolloutSource)  # only what _generate reads
    src.config, src.rollout_mesh, src.iteration, src.rng = config, rollout_mesh, 2, jax.random.key(7)
    src.cfgs, src.gen_cfg = {"policy": cfg}, cfg
    src.ctx = step_lib.Ctx(
        model_cfg=cfg, role_cfgs=(("policy", cfg),)
    )  # no LoRA base: the params as they are
    src.rollout_shardings = model.param_shardings(cfg, rollout_mesh)
    src.vocab = type("V", (), {"eos_id": 258, "pad_id": 0})()
    moved, _ = src._policy_for_rollout({"policy": params})
    assert moved["blocks"]["attn"]["wq"].dtype == jnp.bfloat16
    assert moved["blocks"]["attn_norm"]["scale"].dtype == jnp.float32  # kept as the model casts at use
    assert moved["blocks"]["attn"]["wq"].sharding.spec != params["blocks"]["attn"]["wq"].sharding.spec
    prompts = {
        "prompt_BP": np.random.default_rng(0).integers(0, 258, (8, 6)).astype(np.int32),
        "prompt_lengths_B": np.array([6, 3, 4, 1, 6, 2, 5, 6], np.int32),
    }
    got = src._generate(moved, prompts)
    assert got.tokens_BT.shape == (8, 10) and got.lengths_B.shape == (8,)
    key = jax.random.fold_in(src.rng, 2)
    for i, rows in enumerate((slice(0, 4), slice(4, 8))):
        with jax.set_mesh(rollout_mesh):
            want = sample.generate(
                cfg,
                moved,
                prompts["prompt_BP"][rows],
                jax.random.fold_in(key, i),
                max_new_tokens=10,
                prompt_lengths_B=prompts["prompt_lengths_B"][rows],
                temperature=0.8,
                eos_id=258,
                return_info=True,
            )
        np.testing.assert_array_equal(got.tokens_BT[rows], np.asarray(want.tokens_BT))
        np.testing.assert_allclose(got.logprobs_BT[rows], np.asarray(want.logprobs_BT), atol=1e-6)
        np.testing.assert_array_equal(got.lengths_B[rows], np.asarray(want.lengths_B))
    assert not np.array_equal(got.tokens_BT[:4], got.tokens_BT[4:])


# --------------------------------------------------------------------------------------------------
# A tiny PPO-ptx run: checkpoint inside a rollout, resume, and end where an uninterrupted run ends


def tiny_ppo_config(sft, rm, steps, **over):
    c = defaults.load_config(f"configs/tiny.py:stage=ppo,sft={sft},rm={rm}")
    c.unlock()
    for name, head in (("policy", "lm"), ("value", "scalar")):
        c.roles[name].model = defaults.model_section(tiny_cfg(head))
    c.rollout.update(batch_size=16, max_new_tokens=8, epochs=1, mesh={"data": 2, "fsdp": 1, "tensor": 4})
    c.ptx.ratio = 1
    c.loss.ptx_coef = 0.5
    c.train.update(batch_size=8, seq_len=24, steps=steps, checkpoint_every=1, log_every=1, **over)
    return c


def test_ppo_run_checkpoints_inside_a_rollout_and_resumes_exactly(rl_base, tmp_path):
    sft, rm = rl_base
    whole = str(tmp_path / "whole")
    last = train.run(tiny_ppo_config(sft, rm, 4), whole)  # 2 rollouts x 2 minibatches, a checkpoint a step
    # A run killed inside the second rollout (after step 3's checkpoint): its workdir without the later
    # checkpoints resumes to the same end (killed at the end of a rollout: tests/test_lora_rl.py)
    split = killed_after(whole, tmp_path / "split3", 3)
    assert checkpoint.load_meta(split)[0] == 3
    train.run(tiny_ppo_config(sft, rm, 4), split)
    assert_same_models(whole, split, (("policy", False), ("value", False), ("policy", True)), "resumed at 3")
    # the policy moved, and the EMA trails it
    _, start = checkpoint.load_model(sft)
    _, pol = checkpoint.load_model(whole, role="policy")
    _, ema = checkpoint.load_model(whole, role="policy", ema=True)
    d_pol = optax.tree.norm(jax.tree.map(jnp.subtract, pol, start))
    d_ema = optax.tree.norm(jax.tree.map(jnp.subtract, ema, start))
    assert 0 < float(d_ema) < float(d_pol)

    rows = [json.loads(line) for line in open(os.path.join(split, "metrics.jsonl"))]
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    assert train_steps == [1, 2, 3, 4]
    rollouts = [r for r in rows if r["split"] == "rollout"]
    assert [r["iteration"] for r in rollouts] == [1.0, 2.0]
    for key in (
        "reward",
        "kl",
        "gold_reward",
        "eos_rate",
        "response_length",
        "explained_variance",
        "time/generate",
        "time/score",
        "time/reshard",
    ):
        assert math.isfinite(rollouts[0][key]), key
    for key in ("policy_clipfrac", "value_clipfrac", "approx_kl", "entropy", "ptx_loss", "value_loss"):
        assert math.isfinite(last[key]), key
    assert last["ptx_loss"] > 1.0


def test_ppo_refuses_truncated_sampling_and_half_set_ptx(rl_base, tmp_path):
    sft, rm = rl_base
    c = tiny_ppo_config(sft, rm, 2)
    c.rollout.top_p = 0.9
    c.loss.ptx_coef = 0.0
    with pytest.raises(ValueError) as e:
        train.run(c, str(tmp_path / "bad"))
    assert "off-policy" in str(e.value) and "ptx.ratio=1" in str(e.value)


def test_ppo_13b_config_loads_and_builds_abstractly():
    """The 13B policy / 350M critic config: roles, both layouts' shardings on 8 devices, the PPO checks."""
    from gptjax.rl import rollout
    from gptjax.train import roles as roles_lib
    from gptjax.train import stages

    c = defaults.load_config("configs/ppo_13b.py:sft=/ckpt/sft,rm=/ckpt/rm")
    trained = roles_lib.trained_roles(c, stages.get("ppo"))
    cfgs = {r.name: r.cfg for r in trained}
    assert 12.5e9 < model.num_params(cfgs["policy"]) < 13.5e9
    assert 0.3e9 < model.num_params(cfgs["value"]) < 0.4e9
    cfgs.update(ref=cfgs["policy"], reward=cfgs["value"])
    rollout.check_config(c, cfgs, c.train.batch_size)
    assert c.rollout.batch_size == 512 and c.train.batch_size == 64 and c.rollout.epochs == 1
    assert c.roles.policy.optim.ema_decay == 0.992 and c.loss.ptx_coef == 27.8 and c.ptx.ratio == 8
    for mesh_cfg in (c.mesh, c.rollout.mesh):
        mesh = sharding.make_mesh(mesh_cfg)
        shardings = model.param_shardings(cfgs["policy"], mesh)
        shapes = model.param_shapes(cfgs["policy"])
        per_device = sum(
            math.prod(s.shard_shape(x.shape))
            for s, x in zip(jax.tree.leaves(shardings), jax.tree.leaves(shapes), strict=True)
        )
        split = mesh.shape["fsdp"] * mesh.shape["tensor"]  # FSDP 8 for the update, tensor 4 to decode
        assert per_device < 1.05 * model.num_params(cfgs["policy"]) / split


def test_ppo_1b_config_one_gpu_and_ptx_switch():
    """The one-GPU OPT-1.3B / 350M pair builds and passes the PPO checks; ptx= turns PPO-ptx on."""
    from gptjax.rl import rollout
    from gptjax.train import roles as roles_lib
    from gptjax.train import stages

    c = defaults.load_config("configs/ppo_1b.py:sft=/ckpt/sft,rm=/ckpt/rm")
    cfgs = {r.name: r.cfg for r in roles_lib.trained_roles(c, stages.get("ppo"))}
    assert 1.2e9 < model.num_params(cfgs["policy"]) < 1.45e9  # OPT-1.3B: 1.32B
    assert 0.3e9 < model.num_params(cfgs["value"]) < 0.4e9
    cfgs.update(ref=cfgs["policy"], reward=cfgs["value"])
    rollout.check_config(c, cfgs, c.train.batch_size)
    assert (c.ptx.ratio, c.loss.ptx_coef) == (0, 0.0)
    ptx = defaults.load_config("configs/ppo_1b.py:sft=/s,rm=/r,ptx=/data/*.txt")
    assert (ptx.ptx.ratio, ptx.loss.ptx_coef) == (8, 27.8)
    assert ptx.ptx.seq_len == ptx.train.seq_len == 512
    assert ptx.train.batch_size % ptx.train.micro_batches == 0
