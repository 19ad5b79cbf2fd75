"""Stages as roles: several trained roles in one step, frozen roles, exact mixed-denominator losses over
micro-batches, dynamic scalars without recompiling, role-aware checkpoints and init_from an HF directory."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax import checkpoint, model
from gptjax.losses import lm
from gptjax.train import defaults, roles
from gptjax.train import state as state_lib
from gptjax.train import step as step_lib

CFG = model.ModelConfig.gpt2(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_len=16)
VALUE_CFG = CFG.replace(head="scalar", scalar_head_init="normal")


def _optim(lr, ema=0.0):
    o = copy.deepcopy(defaults.base_config("pretrain").optim)
    o.update(lr=lr, warmup_steps=0, schedule="constant", clip_norm=0.0, ema_decay=ema)
    return o


def _lm_batch(seed=0, B=4, L=12):
    toks = np.random.RandomState(seed).randint(0, 32, (B, L + 1)).astype(np.int32)
    return {"inputs_BL": toks[:, :-1], "targets_BL": toks[:, 1:], "weights_BL": np.ones((B, L), np.float32)}


def two_role_loss(params, batch, rng, ctx):
    """Policy LM loss + a value regression toward the frozen ref's log-prob of the targets."""
    loss, metrics = lm.loss_fn(params["policy"], batch, rng, ctx.replace(model_cfg=ctx.cfg_of("policy")))
    ref_logp_BL = lm.token_logprobs(
        model.apply(ctx.cfg_of("ref"), ctx.frozen["ref"], batch["inputs_BL"]), batch["targets_BL"]
    )
    values_BL = model.apply(ctx.cfg_of("value"), params["value"], batch["inputs_BL"])
    value_loss = jnp.sum((values_BL - jax.lax.stop_gradient(ref_logp_BL)) ** 2)
    total = loss + value_loss
    return total, {**metrics, "loss": (total, metrics["loss"][1])}


def test_two_trained_roles_update_independently_and_frozen_stays_frozen():
    rs = [
        roles.Role("policy", CFG, optim=_optim(1e-2, ema=0.9)),
        roles.Role("value", VALUE_CFG, optim=_optim(1e-4)),
    ]
    params, _ = roles.init_trained(rs, None, jax.random.key(0))
    ref = model.init(CFG, jax.random.key(7))
    ref_before = jax.tree.map(np.array, ref)
    optimizer, schedules = roles.make_optimizer(rs, 10)
    state = state_lib.create(params, optimizer, ema=tuple(roles.ema_decays(rs)))
    assert set(state.ema_params) == {"policy"}  # only the role that keeps an EMA
    ctx = step_lib.Ctx(
        model_cfg=CFG,
        frozen={"ref": ref},
        frozen_cfgs=(("ref", CFG),),
        role_cfgs=(("policy", CFG), ("value", VALUE_CFG)),
    )
    train_step = step_lib.make_train_step(
        two_role_loss, optimizer, ema_decay=roles.ema_decays(rs), lr_schedule=schedules
    )
    before = jax.tree.map(np.array, state.params)
    state, metrics = train_step(state, _lm_batch(), jax.random.key(1), ctx)
    assert float(metrics["lr/policy"]) == pytest.approx(1e-2) and float(metrics["lr/value"]) == pytest.approx(
        1e-4
    )
    # Adam's first update is ~lr per element whatever the gradient's scale: steps follow each role's lr.
    d_pol = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(state.params["policy"]), jax.tree.leaves(before["policy"]), strict=True
        )
    )
    d_val = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(jax.tree.leaves(state.params["value"]), jax.tree.leaves(before["value"]), strict=True)
    )
    assert d_pol == pytest.approx(1e-2, rel=0.05) and d_val == pytest.approx(1e-4, rel=0.05)
    # EMA of the policy: 0.9 * old + 0.1 * new
    for e, old, new in zip(
        jax.tree.leaves(state.ema_params["policy"]),
        jax.tree.leaves(before["policy"]),
        jax.tree.leaves(state.params["policy"]),
        strict=True,
    ):
        np.testing.assert_allclose(e, 0.9 * old + 0.1 * np.asarray(new), rtol=1e-5, atol=1e-7)
    for i in range(3):
        state, metrics = train_step(state, _lm_batch(i + 1), jax.random.key(1), ctx)
    for a, b in zip(jax.tree.leaves(ctx.frozen["ref"]), jax.tree.leaves(ref_before), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)  # bitwise unchanged
    # The optimizer holds Adam's two moments of the trained params and nothing of the frozen ref's size more.
    trained = sum(x.size for x in jax.tree.leaves(state.params))
    in_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert 2 * trained <= in_opt < 2 * trained + 16


def two_term_loss(params, batch, rng, ctx):
    """Term a per a-token, term b per b-token, each over its FULL-batch count (ctx.denominators)."""
    w = params["w"]
    x_B, a_B, b_B = batch["x_B"], batch["a_B"], batch["b_B"]
    d = ctx.denominators
    term_a = jnp.sum(a_B * (w * x_B) ** 2) / d["a"]
    term_b = ctx.scalars.get("coef", 1.0) * jnp.sum(b_B * jnp.abs(w - x_B)) / d["b"]
    share = jnp.sum(a_B) / d["a"]  # this micro-batch's share: the shares add up to 1
    return term_a + term_b, {"loss": (term_a + term_b, share)}


def two_term_denominators(batch, ctx):
    return {"a": jnp.sum(batch["a_B"]), "b": jnp.sum(batch["b_B"])}


def _two_term_batch():
    rng = np.random.RandomState(3)
    # a- and b-tokens spread unevenly, so each micro-batch has different counts of each
    return {
        "x_B": rng.normal(size=16).astype(np.float32),
        "a_B": (rng.uniform(size=16) < 0.7).astype(np.float32),
        "b_B": (np.arange(16) % 5 == 0).astype(np.float32),
    }


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_mixed_denominators_are_exact_over_micro_batches(micro_batches):
    batch = _two_term_batch()
    params = {"w": jnp.float32(0.3)}
    step = step_lib.make_train_step(
        two_term_loss, optax.sgd(1.0), micro_batches=micro_batches, denominators_fn=two_term_denominators
    )
    state = state_lib.create(params, optax.sgd(1.0), ema=False)
    new, metrics = step(state, batch, jax.random.key(0), step_lib.Ctx(model_cfg=None))

    def full(w):  # the full-batch loss, written directly
        a, b, x = batch["a_B"], batch["b_B"], batch["x_B"]
        return jnp.sum(a * (w * x) ** 2) / a.sum() + jnp.sum(b * jnp.abs(w - x)) / b.sum()

    np.testing.assert_allclose(float(metrics["loss"]), float(full(0.3)), rtol=1e-6)
    np.testing.assert_allclose(float(new.params["w"]), 0.3 - float(jax.grad(full)(0.3)), rtol=1e-6)


def test_dynamic_scalars_do_not_recompile():
    batch = _two_term_batch()
    opt = optax.sgd(1.0)
    step = step_lib.make_train_step(two_term_loss, opt, denominators_fn=two_term_denominators)
    losses = []
    for coef in (1.0, 0.0, 2.5):
        state = state_lib.create({"w": jnp.float32(0.3)}, opt, ema=False)
        ctx = step_lib.Ctx(model_cfg=None, scalars={"coef": jnp.float32(coef)})
        losses.append(float(step(state, batch, jax.random.key(0), ctx)[1]["loss"]))
    assert step._cache_size() == 1
    a = losses[1]  # coef 0: term a alone
    np.testing.assert_allclose(losses[2] - a, 2.5 * (losses[0] - a), rtol=1e-5)


def test_role_aware_checkpoint_loads_each_role_and_the_ema(tmp_path):
    params = {"policy": model.init(CFG, jax.random.key(0)), "value": model.init(VALUE_CFG, jax.random.key(1))}
    opt = optax.adam(1e-3)
    state = state_lib.create(params, opt, ema=("policy",))
    state = state.replace(ema_params={"policy": jax.tree.map(lambda x: x + 1.0, state.ema_params["policy"])})
    mngr = checkpoint.manager(str(tmp_path))
    meta = checkpoint.meta_for(CFG, "ppo", roles={"policy": CFG, "value": VALUE_CFG})
    checkpoint.save(mngr, state, data_state={"pos": 3}, meta=meta)
    mngr.wait_until_finished()

    for role, want in [("policy", params["policy"]), ("value", params["value"])]:
        cfg, got = checkpoint.load_model(str(tmp_path), role=role)
        assert cfg == (CFG if role == "policy" else VALUE_CFG)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, ema = checkpoint.load_model(str(tmp_path), role="policy", ema=True)
    for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(params["policy"]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) + 1.0)
    with pytest.raises(ValueError, match="name the one to load"):
        checkpoint.load_model(str(tmp_path))
    with pytest.raises(ValueError, match="no role 'critic'"):
        checkpoint.load_model(str(tmp_path), role="critic")
    with pytest.raises(ValueError, match="no EMA"):
        checkpoint.load_model(str(tmp_path), role="value", ema=True)
    # A critic from this run's policy: the LM head is dropped, the scalar head stays fresh.
    fresh = model.init(VALUE_CFG, jax.random.key(5))
    critic = checkpoint.load_params(
        str(tmp_path),
        fresh,
        role="policy",
        allow_missing=model.head_params(VALUE_CFG),
        allow_extra=("lm_head",),
    )
    np.testing.assert_array_equal(np.asarray(critic["embed"]), np.asarray(params["policy"]["embed"]))
    np.testing.assert_array_equal(np.asarray(critic["value_head"]), np.asarray(fresh["value_head"]))
    # The whole state (both roles, both optimizers' moments, the EMA) resumes.
    restored, data_state = checkpoint.restore(mngr, state)
    assert data_state == {"pos": 3}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_init_from_a_hugging_face_directory(tmp_path, head):
    import transformers

    from gptjax.interop import hf

    hf_cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path / "hf")
    cfg, want = hf.load(str(tmp_path / "hf"))
    role = roles.Role("model", cfg.replace(head=head), init_from=str(tmp_path / "hf"))
    got, _ = roles.init_trained([role], None, jax.random.key(0))
    want_flat = {checkpoint.store._name(p): x for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
    for path, x in jax.tree_util.tree_flatten_with_path(got)[0]:
        name = checkpoint.store._name(path)
        if name in model.head_params(role.cfg):
            assert name not in want_flat  # a fresh scalar head for the reward model
        else:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(want_flat[name]), err_msg=name)
    # What shapes cannot show (the activation here) is refused, naming the field.
    with pytest.raises(ValueError, match="mlp: 'gelu' vs 'gelu_exact'"):
        roles.init_trained(
            [roles.Role("model", role.cfg.replace(mlp="gelu_exact"), str(tmp_path / "hf"))],
            None,
            jax.random.key(0),
        )
    with pytest.raises(ValueError, match="no roles or EMA"):
        roles.init_trained(
            [role.__class__("model", role.cfg, str(tmp_path / "hf"), "policy")], None, jax.random.key(0)
        )
