"""GRPO and RLOO: group advantages on known groups, groups of adjacent rows in a rollout, the losses at the
old policy, micro-batch exactness, config errors, and a tiny run of each stage through train.run."""

import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_params, rl_model_cfg
from ml_collections import FrozenConfigDict

from gptjax import checkpoint, losses, model, train
from gptjax.losses import grpo, logprobs, ppo, rloo
from gptjax.model import sharding
from gptjax.rl import rollout
from gptjax.train import defaults
from gptjax.train import step as step_lib

LOSSES = {"grpo": grpo, "rloo": rloo}
tiny_cfg = rl_model_cfg


# --------------------------------------------------------------------------------------------------
# Advantages on hand-computed groups


def test_rloo_advantage_is_the_reward_minus_the_mean_of_the_others():
    score = jnp.array([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 4.0, 0.0])
    zero = jnp.zeros(8)
    adv = rloo.advantages(score, zero, 0.1, 4, None)
    np.testing.assert_allclose(adv[:4], [1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2], rtol=1e-6)
    np.testing.assert_allclose(adv[4:], [-4 / 3, -4 / 3, 4.0, -4 / 3], rtol=1e-6)
    # the KL penalty is in the reward: r = score - beta * KL, with beta the rollout's kl_coef
    kl = jnp.array([0.0, 0.0, 0.0, 10.0, 0.0, 0.0, 0.0, 0.0])
    adv = rloo.advantages(score, kl, 0.5, 4, None)  # r = [1, 2, 3, 1]
    np.testing.assert_allclose(adv[:4], [1 - 2, 2 - 5 / 3, 3 - 4 / 3, 1 - 2], rtol=1e-6)
    # pairs: each response against the other one
    np.testing.assert_allclose(rloo.advantages(score, zero, 0.0, 2, None), [-1, 1, -3, 3, 0, 0, 4, -4])


def test_grpo_advantage_is_the_reward_standardised_within_its_group():
    opts = FrozenConfigDict(dict(losses.objective("grpo").options))
    score = jnp.array([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    kl = jnp.array([3.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    adv = grpo.advantages(score, kl, 0.5, 4, opts)
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # sample std (G - 1) of [1, 2, 3, 6]: 2.16
    np.testing.assert_allclose(adv[:4], (np.array([1, 2, 3, 6]) - 3) / (std + 1e-4), rtol=1e-6)
    np.testing.assert_array_equal(adv[4:], 0.0)  # a tied group: nothing to learn, KL or not
    # groups are independent: shifting one group's scores changes nothing
    shifted = grpo.advantages(score.at[4:].add(jnp.array([-2.0, 0.0, 0.0, 2.0])), kl, 0.5, 4, opts)
    np.testing.assert_array_equal(shifted[:4], adv[:4])
    np.testing.assert_allclose(shifted[4:], np.array([-2, 0, 0, 2]) / (math.sqrt(8 / 3) + 1e-4), rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# A rollout: each prompt in samples_per_prompt adjacent rows, advantages over each group


class FakePrompts:
    """The prompt-iterator protocol: the same ``batch_size`` random prompts every time."""

    def __init__(self, batch_size, seed=0):
        r = np.random.default_rng(seed)
        self.batch = {
            "prompt_BP": r.integers(1, 250, (batch_size, 16)).astype(np.int32),  # the tiny prompt_len
            "prompt_lengths_B": r.integers(2, 17, batch_size).astype(np.int32),
            "prompt_ids_B": np.arange(batch_size, dtype=np.int32),
        }

    def __next__(self):
        return dict(self.batch)

    def get_state(self):
        return {}

    def set_state(self, state):
        pass


def rl_config(stage, sft="unused", rm="unused", **rollout_over):
    c = defaults.load_config(f"configs/tiny.py:stage={stage},sft={sft},rm={rm}")
    c.unlock()
    for name, r in c.roles.items():
        r.model = defaults.model_section(tiny_cfg("scalar" if name == "value" else "lm"))
    c.rollout.update(batch_size=16, max_new_tokens=8, epochs=1, reward_at="last", gold="", **rollout_over)
    c.train.update(batch_size=8, seq_len=c.rollout.prompt_len + 8)
    return c


@pytest.mark.parametrize("stage,n", [("grpo", 4), ("rloo", 4), ("ppo", 2)])
def test_rollout_puts_each_prompt_in_adjacent_rows_and_advantages_over_each_group(stage, n):
    config = rl_config(stage, samples_per_prompt=n, kl_coef=0.3)
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    lm, scalar = tiny_cfg(), tiny_cfg("scalar")
    policy = random_params(lm, 0, mesh)
    ref = random_params(lm, 1, mesh)  # not the policy: a KL to it
    reward = random_params(scalar, 2, mesh)
    params = {"policy": policy}
    role_cfgs = (("policy", lm),)
    if stage == "ppo":
        params["value"] = random_params(scalar, 3, mesh)
        role_cfgs += (("value", scalar),)
    ctx = step_lib.Ctx(
        model_cfg=lm,
        loss_cfg=FrozenConfigDict(config.loss),
        frozen={"ref": ref, "reward": reward},
        frozen_cfgs=(("ref", lm), ("reward", scalar)),
        role_cfgs=role_cfgs,
    )
    prompts = FakePrompts(16 // n)
    source = rollout.RolloutSource(config, batch_size=8, ctx=ctx, mesh=mesh, prompts=prompts)
    batch = source.next(types.SimpleNamespace(params=params))
    exp = source.buffer
    assert len(batch["tokens_BL"]) == 8 and len(exp["tokens_BL"]) == 16

    # row i holds prompt i // n
    P = prompts.batch["prompt_BP"].shape[1]
    plen = np.repeat(prompts.batch["prompt_lengths_B"], n)
    np.testing.assert_array_equal(exp["prompt_lengths_B"], plen)
    for i in range(16):
        np.testing.assert_array_equal(
            exp["tokens_BL"][i, : plen[i]], prompts.batch["prompt_BP"][i // n, : plen[i]]
        )
    responses = {tuple(exp["tokens_BL"][i, P:]) for i in range(16)}
    assert len(responses) > 16 // n  # sampled per row, not once per prompt

    if stage == "ppo":
        assert "old_values_BL" in exp and "returns_BL" in exp and "ref_logp_BL" not in exp
        metrics = source.pop_metrics()  # PPO's reward carries the KL penalty: it and its coefficient logged
        assert metrics["kl_coef"] == pytest.approx(0.3) and "kl_penalty" in metrics
        return
    assert "old_values_BL" not in exp and "returns_BL" not in exp
    # the advantages, from the reward model's score at the last token and the k1 KL to the reference,
    # recomputed here in numpy over groups of n rows
    tokens, lengths = exp["tokens_BL"], exp["lengths_B"]

    @jax.jit
    def forward(tokens, lengths):
        rm_BL = model.apply(scalar, reward, tokens)
        return (rm_BL, *logprobs.response_logprobs(lm, ref, tokens, plen, lengths))

    rm, ref_logp, mask = map(np.asarray, forward(tokens, lengths))
    score = rm[np.arange(16), lengths - 1]
    np.testing.assert_allclose(exp["ref_logp_BL"], np.where(mask, ref_logp, 0.0), rtol=1e-4, atol=1e-4)
    kl = np.sum(np.where(mask, exp["old_logp_BL"] - ref_logp, 0.0), axis=1)
    if stage == "grpo":
        r = score.reshape(-1, n)
        want = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    else:
        r = (score - 0.3 * kl).reshape(-1, n)
        want = r - (r.sum(1, keepdims=True) - r) / (n - 1)
    adv = exp["advantages_BL"]
    np.testing.assert_allclose(adv, np.where(mask, want.reshape(-1)[:, None], 0.0), rtol=2e-3, atol=2e-3)
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose((adv.sum(1) / mask.sum(1)).reshape(-1, n).sum(1), 0.0, atol=1e-4)  # per group
    metrics = source.pop_metrics()
    assert metrics["group_score_std"] == pytest.approx(np.mean(score.reshape(-1, n).std(1)), rel=1e-3)
    assert metrics["kl"] == pytest.approx(np.mean(kl), rel=1e-3, abs=1e-3)
    # the KL penalty and its coefficient are logged where the reward carries them (RLOO), not for GRPO
    assert ("kl_coef" in metrics and "kl_penalty" in metrics) == (stage == "rloo")


def test_group_configs_refuse_single_samples_broken_groups_and_a_critic():
    lm, scalar = tiny_cfg(), tiny_cfg("scalar")
    cfgs = {"policy": lm, "ref": lm, "reward": scalar}
    rollout.check_config(rl_config("grpo", samples_per_prompt=4), cfgs, 8)  # fine
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        rollout.check_config(rl_config("rloo", samples_per_prompt=1), cfgs, 8)
    with pytest.raises(ValueError, match="must be >= 1 and divide"):
        rollout.check_config(rl_config("grpo", samples_per_prompt=3), cfgs, 8)
    c = rl_config("grpo")
    c.roles.value = defaults.trained_role(scalar, c.roles.policy.optim)
    with pytest.raises(ValueError, match="trains no critic"):
        rollout.check_config(c, {**cfgs, "value": scalar}, 8)
    with pytest.raises(ValueError, match=r"needs the role\(s\) \['value'\]"):  # PPO still needs its critic
        rollout.check_config(rl_config("ppo"), cfgs, 8)
    rollout.check_config(rl_config("ppo", samples_per_prompt=4), {**cfgs, "value": scalar}, 8)
    # GRPO's KL is a loss term: an adaptive target for the rollout's (unused) coefficient is refused
    with pytest.raises(ValueError, match="rollout.kl_target=6.0 adapts rollout.kl_coef, which loss 'grpo'"):
        rollout.check_config(rl_config("grpo", samples_per_prompt=4, kl_target=6.0), cfgs, 8)
    rollout.check_config(rl_config("rloo", samples_per_prompt=4, kl_target=6.0), cfgs, 8)  # in the reward


# --------------------------------------------------------------------------------------------------
# The losses


def synthetic_batch(seed, B=8, L=20):
    r = np.random.default_rng(seed)
    prompt_lengths = r.integers(2, 8, B)
    lengths = prompt_lengths + r.integers(1, L - 8, B)
    return {
        "tokens_BL": r.integers(0, 259, (B, L)).astype(np.int32),
        "prompt_lengths_B": prompt_lengths.astype(np.int32),
        "lengths_B": lengths.astype(np.int32),
        "old_logp_BL": (-r.uniform(0.5, 3, (B, L))).astype(np.float32),
        "ref_logp_BL": (-r.uniform(0.5, 3, (B, L))).astype(np.float32),
        "advantages_BL": np.repeat(r.normal(size=(B, 1)), L, 1).astype(np.float32),
    }


def group_ctx(cfg, stage, **loss):
    return step_lib.Ctx(
        model_cfg=cfg,
        loss_cfg=FrozenConfigDict({**dict(losses.objective(stage).options), **loss}),
        role_cfgs=(("policy", cfg),),
        scalars={"temperature": jnp.float32(0.7)},
    )


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_loss_at_the_old_policy_is_minus_the_mean_advantage_with_the_reinforce_gradient(stage):
    """At ratio 1 the surrogate is -A per token and its gradient -A d logp (REINFORCE); GRPO's k3 KL to a
    reference equal to the policy adds 0 and no gradient, to another reference its mean."""
    loss_mod, cfg = LOSSES[stage], tiny_cfg()
    params = {"policy": random_params(cfg, 0)}
    batch = synthetic_batch(1, B=4)
    mask = np.asarray(ppo.rollout_mask(batch))
    n = mask.sum()

    def reinforce(p):  # -sum A log pi / N, and log pi (the old and reference log-probs below)
        lp, _ = ppo.policy_terms(cfg, p["policy"], batch, 0.7)
        return -jnp.sum(jnp.where(mask, batch["advantages_BL"] * lp, 0.0)) / n, lp

    (_, logp), want = jax.jit(jax.value_and_grad(reinforce, has_aux=True))(params)
    batch["old_logp_BL"] = batch["ref_logp_BL"] = logp = np.asarray(logp)
    ctx = step_lib.with_denominators(group_ctx(cfg, stage), batch, loss_mod.denominators)
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, b: loss_mod.loss_fn(p, b, None, ctx), has_aux=True))
    (loss, m), got = loss_and_grad(params, batch)
    np.testing.assert_allclose(loss, -np.sum(batch["advantages_BL"] * mask) / n, rtol=1e-5)
    assert float(m["policy_clipfrac"][0]) == 0.0 and abs(float(m["approx_kl"][0])) < 1e-6
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    assert float(optax.tree.norm(want)) > 1e-3

    batch["ref_logp_BL"] = logp - 0.5  # a reference 0.5 nats below the policy on every token
    (loss2, m2), _ = loss_and_grad(params, batch)
    k3 = np.exp(-0.5) - 1 + 0.5
    np.testing.assert_allclose(m2["kl_ref"][0] / m2["kl_ref"][1], k3, rtol=1e-4)
    kl_coef = losses.objective("grpo").options["kl_coef"] if stage == "grpo" else 0.0  # RLOO: in the reward
    np.testing.assert_allclose(loss2 - loss, kl_coef * k3, rtol=1e-4, atol=1e-7)


def test_one_or_two_micro_batches_give_the_same_gradient():
    """GRPO's loss, KL term included (RLOO's is the same function with kl_coef 0)."""
    loss_mod, stage, cfg = grpo, "grpo", tiny_cfg()
    params = {"policy": random_params(cfg, 0)}
    batch = jax.tree.map(jnp.asarray, synthetic_batch(0, B=8))
    ctx = group_ctx(cfg, stage, clip=0.1)

    def grads(micro):
        c = step_lib.with_denominators(ctx, batch, loss_mod.denominators)
        g, m = step_lib.grads_and_metrics(loss_mod.loss_fn, params, batch, jax.random.key(0), c, micro)
        return jax.tree.map(lambda x: x / m["loss"][1], g), step_lib.reduce_metrics(m)

    grads = jax.jit(grads, static_argnums=0)
    g1, m1 = grads(1)
    g2, m2 = grads(2)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    for k in ("loss", "policy_loss", "kl_ref", "policy_clipfrac", "approx_kl"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-7)
    assert float(m1["policy_clipfrac"]) > 0.1  # random old log-probs: the clip is exercised
    assert float(optax.tree.norm(g1)) > 1e-3


# --------------------------------------------------------------------------------------------------
# A tiny run of each stage through train.run


@pytest.mark.parametrize("stage", ["grpo", "rloo"])
def test_group_stage_trains_the_policy_alone_from_rollouts(stage, rl_base, tmp_path):
    sft, rm = rl_base
    c = rl_config(stage, sft, rm)
    c.train.update(steps=2, checkpoint_every=2, log_every=1)  # one rollout of 2 minibatches
    workdir = str(tmp_path / stage)
    last = train.run(c, workdir)

    # one trained role, keyed 'policy' (loadable with or without naming it), no critic
    step, meta = checkpoint.load_meta(workdir)
    assert step == 2 and meta["stage"] == stage and set(meta["roles"]) == {"policy"}
    _, start = checkpoint.load_model(sft)
    _, pol = checkpoint.load_model(workdir, role="policy")
    _, same = checkpoint.load_model(workdir)
    moved = optax.tree.norm(jax.tree.map(jnp.subtract, pol, start))
    assert float(moved) > 0 and float(optax.tree.norm(jax.tree.map(jnp.subtract, pol, same))) == 0

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    steps = [r for r in rows if r["split"] == "train"]
    rollouts = [r for r in rows if r["split"] == "rollout"]
    assert [r["step"] for r in steps] == [1, 2] and [r["iteration"] for r in rollouts] == [1.0]
    assert 0 <= rollouts[0]["tied_groups"] <= 1 and rollouts[0]["group_score_std"] > 0
    # step 1 is the first minibatch at the sampling policy, which is also the reference: ratio 1, no KL;
    # step 2 reuses the rollout after an update
    assert abs(steps[0]["approx_kl"]) < 1e-6 and steps[0]["policy_clipfrac"] == 0.0
    assert abs(steps[0]["kl_ref"]) < 1e-6
    assert steps[1]["approx_kl"] > 0 and steps[1]["kl_ref"] > 0
    for key in ("policy_loss", "entropy", "grad_norm", "lr/policy"):
        assert math.isfinite(last[key]), key
