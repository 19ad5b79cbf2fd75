"""Bounds on every numeric knob (refused before the workdir exists, one line per problem) and no non-finite
value in a checkpoint: the save refuses it, RM normalisation refuses a non-finite mean, and a run whose every
step was skipped does not end as a success."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import logged, rl_model_cfg, tiny_config, toy_state

from gptjax import checkpoint, train
from gptjax.model import sharding
from gptjax.rl import reward, rollout_config
from gptjax.train import build, guard, sources

# (stage, key, value, the line's message)
BAD = [
    ("sft", "optim.lr", -1e-3, "optim.lr=-0.001: must be >= 0"),
    ("sft", "optim.clip_norm", -1.0, "optim.clip_norm=-1.0: must be >= 0"),
    ("sft", "optim.ema_decay", -0.5, "optim.ema_decay=-0.5: must be in [0, 1)"),
    ("sft", "optim.ema_decay", 1e10, "optim.ema_decay=10000000000.0: must be in [0, 1)"),
    ("sft", "optim.warmup_steps", -1, "optim.warmup_steps=-1: must be >= 0"),
    ("sft", "optim.min_lr_ratio", 1.5, "optim.min_lr_ratio=1.5: must be in [0, 1]"),
    ("sft", "optim.b1", 1.0, "optim.b1=1.0: must be in [0, 1)"),
    ("sft", "optim.b2", -0.1, "optim.b2=-0.1: must be in [0, 1)"),
    ("sft", "optim.eps", 0.0, "optim.eps=0.0: must be > 0"),
    ("sft", "optim.weight_decay", -0.1, "optim.weight_decay=-0.1: must be >= 0"),
    ("sft", "optim.lr", float("nan"), "optim.lr=nan: must be >= 0"),
    ("sft", "train.keep_checkpoints", 0, "train.keep_checkpoints=0: must be >= 1"),
    ("sft", "train.checkpoint_every", 0, "train.checkpoint_every=0: must be >= 1"),
    ("sft", "train.log_every", 0, "train.log_every=0: must be >= 1"),
    ("sft", "train.micro_batches", 0, "train.micro_batches=0: must be >= 1"),
    ("sft", "train.batch_size", 0, "train.batch_size=0: must be >= 1"),
    ("sft", "train.seq_len", 0, "train.seq_len=0: must be >= 1"),
    ("sft", "train.eval_every", -1, "train.eval_every=-1: must be >= 0"),
    ("pretrain", "train.eval_steps", 0, "train.eval_steps=0: must be >= 1 when train.eval_every > 0"),
    ("dpo", "loss.beta", 0.0, "loss.beta=0.0: must be > 0"),
    ("dpo", "loss.label_smoothing", 0.5, "loss.label_smoothing=0.5: must be in [0, 0.5)"),
    ("ppo", "rollout.kl_coef", -0.02, "rollout.kl_coef=-0.02: must be >= 0"),
    ("ppo", "rollout.epochs", 0, "rollout.epochs=0: must be >= 1"),
    ("ppo", "rollout.max_new_tokens", 0, "rollout.max_new_tokens=0: must be >= 1"),
    ("ppo", "rollout.prompt_len", 0, "rollout.prompt_len=0: must be >= 1"),
    ("ppo", "rollout.gamma", 1.5, "rollout.gamma=1.5: must be in [0, 1]"),
    ("ppo", "rollout.lam", -0.1, "rollout.lam=-0.1: must be in [0, 1]"),
    ("ppo", "rollout.reward_clip", -1.0, "rollout.reward_clip=-1.0: must be >= 0"),
    ("ppo", "rollout.missing_eos_penalty", -1.0, "rollout.missing_eos_penalty=-1.0: must be >= 0"),
    ("ppo", "loss.clip", 0.0, "loss.clip=0.0: must be > 0"),
    ("ppo", "loss.value_clip", -0.2, "loss.value_clip=-0.2: must be >= 0"),
    ("ppo", "loss.vf_coef", -0.5, "loss.vf_coef=-0.5: must be >= 0"),
    ("ppo", "loss.entropy_coef", -0.1, "loss.entropy_coef=-0.1: must be >= 0"),
    ("ppo", "loss.ptx_coef", -1.0, "loss.ptx_coef=-1.0: must be >= 0"),
    ("ppo", "roles.value.optim.lr", -1.0, "config.roles.value.optim.lr=-1.0: must be >= 0"),
    (
        "ppo",
        "roles.policy.optim.ema_decay",
        1.0,
        "config.roles.policy.optim.ema_decay=1.0: must be in [0, 1)",
    ),
    ("grpo", "loss.clip", -0.2, "loss.clip=-0.2: must be > 0"),
    ("grpo", "loss.kl_coef", -0.04, "loss.kl_coef=-0.04: must be >= 0"),
    ("grpo", "loss.length_norm", -1.0, "loss.length_norm=-1.0: must be >= 0"),
    ("grpo", "loss.aggregation", "tokens", "loss.aggregation='tokens': use one of ('token_mean'"),
    ("grpo", "loss.kl_estimator", "k4", "loss.kl_estimator='k4': use one of ('k1'"),
]


def _config(stage, key, value):
    c = tiny_config(stage)
    *path, name = key.split(".")
    section = c
    for part in path:
        section = section[part]
    setattr(section, name, value)
    if key == "train.eval_steps":
        c.train.eval_every = 5
    return c


@pytest.mark.parametrize("stage,key,value,line", BAD, ids=[f"{s}-{k}={v}" for s, k, v, _ in BAD])
def test_a_knob_out_of_bounds_is_refused_before_the_workdir_exists(stage, key, value, line, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError) as refused:
        train.run(_config(stage, key, value), str(workdir))
    assert any(row.startswith(f"  {line}") for row in str(refused.value).splitlines()), refused.value
    assert not workdir.exists()


def test_every_problem_is_named_on_its_own_line(tmp_path):
    c = tiny_config("sft")
    c.optim.lr, c.optim.clip_norm, c.train.keep_checkpoints, c.train.micro_batches = -1.0, -1.0, 0, 0
    with pytest.raises(ValueError) as refused:
        train.run(c, str(tmp_path / "run"))
    lines = str(refused.value).splitlines()
    assert lines[0] == "invalid config:"
    for key in ("optim.lr=", "optim.clip_norm=", "train.keep_checkpoints=", "train.micro_batches="):
        assert sum(line.strip().startswith(key) for line in lines) == 1, (key, lines)
    assert not (tmp_path / "run").exists()


def test_boundary_values_are_accepted():
    """lr 0 (params stay put), clip_norm 0 (no clipping), ema_decay 0 (no EMA): what the 0s always meant."""
    c = tiny_config("sft")
    c.optim.update(lr=0.0, clip_norm=0.0, ema_decay=0.0, warmup_steps=0, min_lr_ratio=1.0, b1=0.0)
    c.train.eval_every = 0
    roles = build.trained_roles(c, sharding.make_mesh(c.mesh))  # the run's own check: raises nothing
    assert [r.optim.lr for r in roles] == [0.0]
    assert build.bound_problems(c.optim, "optim", build.OPTIM_BOUNDS) == []
    assert build.bound_problems(c.train, "train", build.TRAIN_BOUNDS) == []


def test_the_rollout_source_refuses_the_same_bounds():
    """rollout_config.check_config (what the rollout source and the planner call) names the key too."""
    c = tiny_config("ppo")
    c.rollout.kl_coef, c.rollout.gamma = -0.1, 2.0
    cfgs = {"policy": rl_model_cfg(), "ref": rl_model_cfg(), "value": rl_model_cfg("scalar")}
    cfgs["reward"] = cfgs["value"]
    with pytest.raises(ValueError) as refused:
        rollout_config.check_config(c, cfgs, c.train.batch_size)
    text = str(refused.value)
    assert "rollout.kl_coef=-0.1: must be >= 0" in text and "rollout.gamma=2.0: must be in [0, 1]" in text


@pytest.mark.parametrize("item", ["params", "ema", "opt_state"])
def test_a_nonfinite_state_is_never_written(item, tmp_path):
    mngr = checkpoint.manager(str(tmp_path / "w"))
    good = toy_state(1).replace(ema_params={"w_DD": jnp.ones((4, 4)), "b_D": jnp.ones(4)})
    checkpoint.save(mngr, good, data_state={}, meta={})
    mngr.wait_until_finished()
    bad = toy_state(2).replace(ema_params=good.ema_params)
    if item == "params":
        bad = bad.replace(params={**bad.params, "b_D": jnp.asarray(bad.params["b_D"]).at[3].set(jnp.nan)})
    elif item == "ema":
        bad = bad.replace(ema_params={**bad.ema_params, "w_DD": bad.ema_params["w_DD"].at[0, 0].set(jnp.inf)})
    else:
        bad = bad.replace(opt_state=_poison(bad.opt_state))
    with pytest.raises(FloatingPointError, match=rf"step 2 not written: {item} holds .*first at {item}\["):
        checkpoint.save(mngr, bad, data_state={}, meta={})
    mngr.wait_until_finished()
    assert mngr.all_steps() == [1]


def _poison(tree):
    """The tree with a NaN in the last element of its last floating-point leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    i = max(i for i, x in enumerate(leaves) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact))
    leaves[i] = jnp.asarray(leaves[i]).reshape(-1).at[-1].set(jnp.nan).reshape(jnp.shape(leaves[i]))
    return jax.tree.unflatten(treedef, leaves)


def test_rm_normalisation_refuses_a_nonfinite_mean(monkeypatch):
    c = tiny_config("rm")
    c.normalize.examples = 4
    monkeypatch.setattr(reward, "full_params", lambda params, ctx: params)
    monkeypatch.setattr(reward, "score", lambda ctx, p, vocab, demos, n: [np.array([0.5, np.nan])])
    state = types.SimpleNamespace(params={"value_bias": jnp.zeros(())}, ema_params=None)
    with pytest.raises(FloatingPointError, match=r"scored the 4 demonstrations .* nan on average"):
        reward.normalize_state(c, state, None, None)


class AllNaN:
    """A data source whose every batch has NaN weights: every step's update is skipped."""

    def __init__(self, inner):
        self.inner = inner

    def next(self, train_state=None):
        batch = self.inner.next(train_state)
        return {**batch, "weights_BL": batch["weights_BL"] * np.float32("nan")}

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_run_that_skipped_every_step_does_not_succeed(tmp_path, monkeypatch):
    make = sources.make_source
    monkeypatch.setattr(sources, "make_source", lambda *a, **k: AllNaN(make(*a, **k)))
    over = {"model.d_model": 32, "model.n_heads": 2, "model.n_layers": 1, "train.seq_len": 32}
    c = tiny_config(
        "pretrain", **over, **{"train.steps": 3, "train.log_every": 1, "train.checkpoint_every": 2}
    )
    workdir = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"steps 1..3: all 3 steps this run made .* skipped"):
        train.run(c, workdir)
    assert [r["skipped"] for r in logged(workdir)] == [1, 1, 1]
    assert 3 not in checkpoint.manager(workdir, create=False).all_steps()


def test_the_all_skipped_check_counts_only_this_process_steps():
    n = guard.NonFinite("skip", 10)
    n.check_not_all_skipped(0)  # no step run (a finished workdir resumed): nothing to say
    n.check(1, {"skipped": 0.0}, None)
    n.check(2, {"skipped": 1.0, "loss": float("nan")}, None)
    n.check_not_all_skipped(2)  # one step trained
    only = guard.NonFinite("skip", 10)
    only.check(5, {"skipped": 1.0, "loss": float("nan")}, None)
    with pytest.raises(FloatingPointError, match=r"steps 5..5: all 1 steps"):
        only.check_not_all_skipped(5)
