"""Objectives as units: every stage's declaration, the one-way losses package, and the three objectives added
as one file each (GSPO, REINFORCE++, KTO): their formulas on hand-made numbers (oracles in numpy), micro-batch
exactness, the rollout's checks of group size and KL placement, and a two-step run of each through train.run.
"""

import ast
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import ROOT, random_params, rank_batch, rl_model_cfg
from ml_collections import FrozenConfigDict

from gptjax import checkpoint, losses, train
from gptjax.losses import gspo, kto, logprobs, ppo, reinforce_pp
from gptjax.rl import rollout
from gptjax.train import build, defaults, stages
from gptjax.train import step as step_lib

tiny_cfg = rl_model_cfg


# --------------------------------------------------------------------------------------------------
# The declarations


def test_every_stage_names_an_objective_that_declares_its_options_and_needs():
    for name, stage in stages.STAGES.items():
        obj = stage.objective
        assert isinstance(obj, losses.Objective)
        assert stage.data in obj.data and stage.data in losses.DATA_FORMATS, name
        assert (stage.source == "rollout") == obj.rl, name
        section = defaults.loss_section(name)  # config.loss comes from the declaration
        assert dict(section) == {"name": stage.loss, **obj.options}, name
    want = {  # (frozen roles, critic, min group, KL placement)
        "ppo": (("ref", "reward"), True, 1, "reward"),
        "grpo": (("ref", "reward"), False, 2, "loss"),
        "rloo": (("ref", "reward"), False, 2, "reward"),
        "gspo": (("ref", "reward"), False, 2, "none"),
        "reinforce_pp": (("ref", "reward"), False, 1, "reward"),
        "dapo": (("ref", "reward"), False, 2, "loss"),  # a KL loss term, off by default (kl_coef 0)
        "dr_grpo": (("ref", "reward"), False, 2, "loss"),
        "dpo": (("ref",), False, 1, "none"),
        "kto": (("ref",), False, 1, "none"),
    }
    for name, (frozen, critic, group, kl) in want.items():
        obj = losses.objective(name)
        assert (obj.frozen, obj.critic, obj.min_group, obj.kl) == (frozen, critic, group, kl), name
        assert (obj.advantages is not None) == (obj.rl and not critic), name
    assert stages.get("sft").data == "sft" and stages.get("pretrain").data == "pretrain"
    assert stages.get("kto").data == "rm" and stages.get("kto").frozen == ("ref",)


def test_objective_lookup_errors_name_the_config_key():
    with pytest.raises(ValueError, match=r"config.loss.name='nope': no module gptjax.losses.nope"):
        losses.objective("nope")
    with pytest.raises(ValueError, match="config.loss.name='logprobs'.*declares no OBJECTIVE"):
        losses.objective("logprobs")
    assert losses.objective("gptjax.losses.kto") is kto.OBJECTIVE  # a dotted path is a module of its own
    with pytest.raises(ValueError, match="critic-free RL objective needs advantages"):
        losses.Objective(loss_fn=lambda *a: None, data=("prompts",))
    with pytest.raises(ValueError, match="describe rollouts"):
        losses.Objective(loss_fn=lambda *a: None, data=("rm",), min_group=2)
    # options: the declared defaults, overridden where config.loss (or a partial dict) gives one
    opts = kto.OBJECTIVE.options_of(FrozenConfigDict({"beta": 0.5}))
    assert (opts.beta, opts.desirable_weight, opts.undesirable_weight) == (0.5, 1.0, 1.0)


def test_a_config_loss_other_than_the_stage_default_brings_its_own_needs():
    c = defaults.load_config("configs/tiny.py:stage=dpo")
    c.loss.name = "kto"
    assert stages.of_config(c).frozen == ("ref",) and stages.of_config(c).data == "rm"
    c.loss.name = "grpo"
    with pytest.raises(ValueError, match="cannot feed it"):
        stages.of_config(c)


def test_the_losses_package_imports_nothing_above_it():
    """losses sit below rl and train: gptjax.rl re-exports the KL estimators and shift_right from here."""
    for path in sorted(pathlib.Path(ROOT, "gptjax", "losses").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            bad = [n for n in names if n.startswith(("gptjax.rl", "gptjax.train")) or n == "gptjax.rl"]
            assert not bad, (path.name, bad)
    from gptjax import rl
    from gptjax.losses import kl, masked

    assert rl.kl_penalty is kl.kl_penalty and rl.shift_right is masked.shift_right


# --------------------------------------------------------------------------------------------------
# GSPO


def test_gspo_sequence_loss_on_hand_made_ratios():
    lo, hi = 3e-4, 4e-4
    log_s = np.array([0.0, 1e-3, -1e-3, -1e-3, 2e-4, 1e-3])
    adv = np.array([1.0, 2.0, 1.0, -1.0, -0.5, -1.0])
    loss, clipped = gspo.sequence_loss(jnp.asarray(log_s), jnp.asarray(adv), lo, hi)
    s = np.exp(log_s)
    # A > 0: the gain stops at s = 1 + hi; A < 0: the loss stops at s = 1 - lo; inside, -s A
    want = [-1.0, -2.0 * (1 + hi), -s[2], (1 - lo) * 1.0, 0.5 * s[4], s[5]]
    np.testing.assert_allclose(loss, want, rtol=1e-7)
    np.testing.assert_array_equal(clipped, [False, True, False, True, False, False])


def rollout_batch(seed, B=8, L=20):
    r = np.random.default_rng(seed)
    prompt_lengths = r.integers(2, 8, B)
    lengths = prompt_lengths + r.integers(1, L - 8, B)
    return {
        "tokens_BL": r.integers(0, 259, (B, L)).astype(np.int32),
        "prompt_lengths_B": prompt_lengths.astype(np.int32),
        "lengths_B": lengths.astype(np.int32),
        "ref_logp_BL": (-r.uniform(0.5, 3, (B, L))).astype(np.float32),
        "advantages_BL": np.repeat(r.normal(size=(B, 1)), L, 1).astype(np.float32),
    }


def policy_ctx(cfg, loss_name, **loss):
    return step_lib.Ctx(
        model_cfg=cfg,
        loss_cfg=FrozenConfigDict({"name": loss_name, **loss}),
        role_cfgs=(("policy", cfg),),
        scalars={"temperature": jnp.float32(0.7)},
    )


@pytest.fixture(scope="module")
def policy():
    cfg = tiny_cfg()
    params = {"policy": random_params(cfg, 0)}
    logp = jax.jit(lambda p, b: ppo.policy_terms(cfg, p["policy"], b, 0.7)[0])
    return cfg, params, logp


def test_gspo_loss_and_gradient_from_per_sequence_ratios(policy):
    """Old log-probs offset from the policy's by known amounts per token: s_i = exp(mean offset), the loss
    -mean_i min(s A, clip(s) A), and the gradient sum_i -(A_i s_i / n_i) sum_t grad log pi over the rows
    that are not clipped, / the number of rows."""
    cfg, params, logp_fn = policy
    batch = rollout_batch(1)
    mask = np.asarray(ppo.rollout_mask(batch))
    logp = np.asarray(logp_fn(params, batch))
    r = np.random.default_rng(2)
    offsets = r.normal(0.0, 4e-4, mask.shape) * mask  # mean per row within a few 1e-4 of 0
    batch["old_logp_BL"] = (logp - offsets).astype(np.float32)
    ctx = policy_ctx(cfg, "gspo")
    (loss, m), grads = jax.jit(jax.value_and_grad(lambda p, b: gspo.loss_fn(p, b, None, ctx), has_aux=True))(
        params, batch
    )

    n = mask.sum(1)
    log_s = np.asarray(logp_fn(params, batch)) - batch["old_logp_BL"]  # the policy's own log-probs again
    log_s = (log_s * mask).sum(1) / n
    A = batch["advantages_BL"][:, 0]
    s = np.exp(log_s)
    per_row = np.maximum(-A * s, -A * np.clip(s, 1 - 3e-4, 1 + 4e-4))
    np.testing.assert_allclose(loss / m["loss"][1], per_row.mean(), rtol=1e-5)
    assert m["loss"][1] == 8
    live = -A * s >= -A * np.clip(s, 1 - 3e-4, 1 + 4e-4)  # unclipped branch (ties: the gradient flows)
    assert 0 < live.sum() < 8  # both branches are exercised
    np.testing.assert_allclose(m["policy_clipfrac"][0], (~live).sum())

    w = np.where(live, -A * s / n, 0.0)[:, None] * mask

    def weighted(p):
        return jnp.sum(w * ppo.policy_terms(cfg, p["policy"], batch, 0.7)[0])

    want = jax.jit(jax.grad(weighted))(params)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # entries ~0.1-1: rounding
    assert float(optax.tree.norm(want)) > 1e-4


# --------------------------------------------------------------------------------------------------
# REINFORCE++


def test_reinforce_pp_advantages_are_whitened_returns_of_the_kl_shaped_reward():
    mask = np.array([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], bool)
    kl = np.array([[0, 0.5, -0.2, 0.3, 0, 0], [0, 0, 0.1, 0.1, 0.4, -1.0], [2.0, 0.0, 0, 0, 0, 0]])
    score = np.array([1.0, -0.5, 3.0])
    beta = 0.1
    got = reinforce_pp.token_advantages(
        losses.ScoredRollout(jnp.asarray(score), jnp.asarray(kl * mask), jnp.asarray(mask), beta, 1), None
    )
    # oracle: per row, r_t = -beta KL_t (+ score at the last response token), G_t = sum of r from t on
    G = np.zeros(mask.shape)
    for b in range(3):
        ts = np.flatnonzero(mask[b])
        rewards = [-beta * kl[b, t] + (score[b] if t == ts[-1] else 0.0) for t in ts]
        for i, t in enumerate(ts):
            G[b, t] = sum(rewards[i:])
    vals = G[mask]
    want = np.where(mask, (G - vals.mean()) / np.sqrt(vals.var() + 1e-8), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(G[0, 1:4], [1.0 - 0.06, 1.0 - 0.01, 1.0 - 0.03], rtol=1e-6)  # by hand


# --------------------------------------------------------------------------------------------------
# KTO


def test_kto_loss_on_hand_made_log_ratios():
    rho = jnp.array([2.0, -1.0, 0.5, 0.5])
    desirable = jnp.array([True, False, True, False])
    z0, beta = 0.5, 0.1
    sig = lambda x: 1 / (1 + np.exp(-x))
    got = kto.kto_loss(rho, desirable, z0, beta, desirable_weight=1.0, undesirable_weight=2.0)
    want = [1 - sig(0.1 * 1.5), 2 * (1 - sig(0.1 * 1.5)), 0.5, 2 * 0.5]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # the best valid response is desirable, the worst undesirable; a prompt with one response has no label
    valid = jnp.array([[True, True, True, False], [True, False, False, False], [True, True, False, False]])
    d, u = kto.labels(valid)
    np.testing.assert_array_equal(d, [[1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(u, [[0, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]])


def kto_ctx(cfg, ref, **loss):
    return step_lib.Ctx(
        model_cfg=cfg,
        loss_cfg=FrozenConfigDict({"name": "kto", **loss}),
        frozen={"ref": ref},
        frozen_cfgs=(("ref", cfg),),
    )


@pytest.fixture(scope="module")
def kto_models():
    cfg = tiny_cfg()
    policy, ref = random_params(cfg, 3, std=0.2), random_params(cfg, 4, std=0.2)
    return cfg, policy, ref


def test_kto_loss_fn_against_a_numpy_oracle(kto_models):
    cfg, policy, ref = kto_models
    batch = rank_batch([4, 2, 3, 1, 0, 4], seed=1)
    ctx = kto_ctx(cfg, ref, beta=0.3, undesirable_weight=1.5)
    loss, m = jax.jit(lambda p, b: kto.loss_fn(p, b, None, ctx))(policy, batch)

    seq = jax.jit(lambda p, b: logprobs.sequence_logprobs(cfg, p, *b))
    args = (batch["tokens_BKL"], batch["prompt_lengths_BK"], batch["lengths_BK"])
    rho = np.asarray(seq(policy, args)) - np.asarray(seq(ref, args))
    valid = batch["valid_BK"]
    z0 = max(0.0, rho[valid].mean())
    sig = lambda x: 1 / (1 + np.exp(-x))
    terms = []
    for b, n in enumerate(valid.sum(1)):
        if n >= 2:  # best = 0, worst = n - 1 (the valid responses come first)
            terms += [1 - sig(0.3 * (rho[b, 0] - z0)), 1.5 * (1 - sig(0.3 * (z0 - rho[b, n - 1])))]
    np.testing.assert_allclose(m["loss"][1], len(terms))
    np.testing.assert_allclose(loss, np.sum(terms), rtol=1e-5)
    np.testing.assert_allclose(m["reference_point"][0], z0, rtol=1e-5, atol=1e-7)
    pairs = [
        (b, i, j) for b in range(6) for i in range(4) for j in range(i + 1, 4) if valid[b, i] and valid[b, j]
    ]
    acc = np.mean([rho[b, i] > rho[b, j] for b, i, j in pairs])
    np.testing.assert_allclose(m["accuracy"][0] / m["accuracy"][1], acc, rtol=1e-6)


def test_kto_micro_batches_add_up_exactly_from_the_reference(kto_models):
    """At the start of a run (policy == ref) z0 is 0 in every micro-batch, so one or two micro-batches of
    prompts with 4, 2, 3, 1, 0, 4, 2, 3 valid responses give the same loss and gradient."""
    cfg, _, ref = kto_models
    batch = jax.tree.map(jnp.asarray, rank_batch([4, 2, 3, 1, 0, 4, 2, 3], seed=2))
    ctx = kto_ctx(cfg, ref)

    def grads(micro):
        g, m = step_lib.grads_and_metrics(kto.loss_fn, ref, batch, jax.random.key(0), ctx, micro)
        return jax.tree.map(lambda x: x / m["loss"][1], g), step_lib.reduce_metrics(m)

    grads = jax.jit(grads, static_argnums=0)
    (g1, m1), (g2, m2) = grads(1), grads(2)
    np.testing.assert_allclose(m1["loss"], 0.5, rtol=1e-6)  # 1 - sigmoid(0) for every counted response
    for k in ("loss", "accuracy", "margin"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)
    assert float(optax.tree.norm(g1)) > 1e-4


# --------------------------------------------------------------------------------------------------
# Micro-batches, the rollout's checks, and a two-step run of each


@pytest.mark.parametrize("name", ["gspo", "reinforce_pp"])
def test_one_or_two_micro_batches_give_the_same_gradient(name, policy):
    cfg, params, logp_fn = policy
    obj = losses.objective(name)
    batch = rollout_batch(3)
    noise = np.random.default_rng(4).normal(0.0, 5e-4 if name == "gspo" else 0.3, batch["ref_logp_BL"].shape)
    batch["old_logp_BL"] = (np.asarray(logp_fn(params, batch)) + noise).astype(np.float32)
    batch = jax.tree.map(jnp.asarray, batch)
    ctx = policy_ctx(cfg, name)

    def grads(micro):
        c = step_lib.with_denominators(ctx, batch, obj.denominators)
        g, m = step_lib.grads_and_metrics(obj.loss_fn, params, batch, jax.random.key(0), c, micro)
        return jax.tree.map(lambda x: x / m["loss"][1], g), step_lib.reduce_metrics(m)

    grads = jax.jit(grads, static_argnums=0)
    (g1, m1), (g2, m2) = grads(1), grads(2)
    for k in ("loss", "policy_loss", "policy_clipfrac", "kl_ref"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-7)
    assert 0.05 < float(m1["policy_clipfrac"]) < 0.95
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def rl_config(stage, sft="unused", rm="unused", **rollout_over):
    c = defaults.load_config(f"configs/tiny.py:stage={stage},sft={sft},rm={rm}")
    c.unlock()
    c.roles.policy.model = defaults.model_section(tiny_cfg())
    c.rollout.update(batch_size=16, max_new_tokens=8, epochs=1, reward_at="last", gold="", **rollout_over)
    c.train.update(batch_size=8, seq_len=c.rollout.prompt_len + 8)
    return c


def test_the_rollout_takes_group_size_and_kl_placement_from_the_objective():
    lm, scalar = tiny_cfg(), tiny_cfg("scalar")
    cfgs = {"policy": lm, "ref": lm, "reward": scalar}
    rollout.check_config(rl_config("reinforce_pp", samples_per_prompt=1, kl_target=6.0), cfgs, 8)
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        rollout.check_config(rl_config("gspo", samples_per_prompt=1), cfgs, 8)
    with pytest.raises(ValueError, match="loss 'gspo' does not use .* is not penalised"):
        rollout.check_config(rl_config("gspo", samples_per_prompt=4, kl_target=6.0), cfgs, 8)
    assert rollout.roles_needed(rl_config("gspo")) == ("policy", "ref", "reward")
    assert rollout.reward_kl(rl_config("reinforce_pp")) and not rollout.reward_kl(rl_config("gspo"))


def test_dapo_and_dr_grpo_run_like_grpo_from_their_table_lines():
    """Their tiny configs: GRPO's rollouts (4 answers per prompt, no critic, no KL in the reward) with the
    papers' loss options; the rollout and the builder's bounds accept them."""
    lm, scalar = tiny_cfg(), tiny_cfg("scalar")
    cfgs = {"policy": lm, "ref": lm, "reward": scalar}
    grpo = rl_config("grpo")
    for stage in ("dapo", "dr_grpo"):
        c = rl_config(stage)
        assert stages.of_config(c).loss == stage and set(c.roles) == {"policy"}
        assert c.rollout.to_dict() == grpo.rollout.to_dict() and c.train.to_dict() == grpo.train.to_dict()
        assert dict(c.loss) == {
            "name": stage,
            **losses.objective(stage).options,
            **({"length_norm": 16.0} if stage == "dr_grpo" else {}),  # tiny.py's max_new_tokens
        }
        rollout.check_config(c, cfgs, 8)
        assert not rollout.reward_kl(c) and not build.bound_problems(c.loss, "loss", build.LOSS_BOUNDS)
        with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
            rollout.check_config(rl_config(stage, samples_per_prompt=1), cfgs, 8)


@pytest.mark.parametrize("stage", ["gspo", "reinforce_pp", "kto"])
def test_each_new_stage_runs_from_its_table_line(stage, rl_base, tmp_path):
    sft, rm = rl_base
    if stage == "kto":
        c = defaults.load_config("configs/tiny.py:stage=kto")
        c.model = defaults.model_section(tiny_cfg())
        c.train.update(init_from=sft, batch_size=8, seq_len=64, steps=2, eval_every=0, log_every=1)
    else:
        c = rl_config(stage, sft, rm)
        c.train.update(steps=2, log_every=1)
    c.train.checkpoint_every = 2
    workdir = str(tmp_path / stage)
    last = train.run(c, workdir)
    step, meta = checkpoint.load_meta(workdir)
    assert step == 2 and meta["stage"] == stage
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert np.isfinite(last["loss"]) and last["grad_norm"] > 0
    if stage == "reinforce_pp":  # one response per prompt, the KL penalty in the reward
        assert c.rollout.samples_per_prompt == 1
        assert "kl_penalty" in [r for r in rows if r["split"] == "rollout"][0]
