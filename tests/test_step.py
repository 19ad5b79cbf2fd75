"""The one train step: sharded == single device, gradient accumulation == big batch, optimizer pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model
from gptjax.losses import lm
from gptjax.model import sharding
from gptjax.train import defaults, optim, state, step

CFG = model.ModelConfig.llama(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_len=32)


def lm_batch(B=8, L=16, seed=0):
    r = np.random.default_rng(seed)
    seg = np.ones((B, L), np.int32)
    seg[:, L // 2 :] = 2  # two packed documents per row
    return {
        "inputs_BL": r.integers(0, 64, (B, L)).astype(np.int32),
        "targets_BL": r.integers(0, 64, (B, L)).astype(np.int32),
        "weights_BL": (r.random((B, L)) > 0.3).astype(np.float32),
        "segment_ids_BL": seg,
        "positions_BL": np.asarray(model.positions_from_segments(jnp.asarray(seg)), np.int32),
    }


def optim_cfg(**kw):
    c = defaults.base_config("pretrain").optim
    c.update({"lr": 1e-2, "warmup_steps": 2, "weight_decay": 0.1, **kw})
    return c


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)  # on the host: eager jnp would compile each op for each shape
    return float(np.linalg.norm((a - b).ravel()) / (np.linalg.norm(b.ravel()) + 1e-12))


def test_mesh_2x2x2_equals_single_device():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh.devices.size == 8
    ctx = step.Ctx(model_cfg=CFG)
    batch = lm_batch()
    rng = jax.random.key(0)
    params = model.init(CFG, jax.random.key(1))
    sharded = model.init(CFG, jax.random.key(1), mesh)
    # params really are laid out as the rules say
    specs = jax.tree.map(lambda x: x.sharding.spec, sharded)
    assert specs["blocks"]["attn"]["wq"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert specs["blocks"]["mlp"]["w_out"] == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    assert specs["embed"] == jax.sharding.PartitionSpec("tensor", "fsdp")
    wq = sharded["blocks"]["attn"]["wq"]
    assert wq.addressable_shards[0].data.shape == (2, 32, 2, 16)

    fn = jax.jit(lambda p, b: step.grads_and_metrics(lm.loss_fn, p, b, rng, ctx))
    g1, m1 = fn(params, batch)
    g8, m8 = fn(sharded, sharding.shard_batch(batch, mesh))
    assert rel_err(m8["loss"][0], m1["loss"][0]) <= 1e-5
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1), strict=True):
        assert rel_err(a, b) <= 1e-5


def test_gradient_accumulation_equals_full_batch():
    params = model.init(CFG, jax.random.key(1))
    ctx = step.Ctx(model_cfg=CFG)
    batch = lm_batch(B=8)
    grads = jax.jit(step.grads_and_metrics, static_argnums=(0, 5))
    g1, m1 = grads(lm.loss_fn, params, batch, jax.random.key(0), ctx, 1)
    g4, m4 = grads(lm.loss_fn, params, batch, jax.random.key(0), ctx, 4)
    assert float(m4["loss"][1]) == float(m1["loss"][1]) == float(batch["weights_BL"].sum())
    assert rel_err(m4["loss"][0], m1["loss"][0]) <= 1e-6
    for a, b in zip(jax.tree.leaves(g4), jax.tree.leaves(g1), strict=True):
        assert rel_err(a, b) <= 1e-5

    # and a whole optimizer step (with EMA) lands on the same params
    opt = optim.make_optimizer(optim_cfg(lr=1e-3), 10)
    outs = []
    for micro in (1, 4):
        f = step.make_train_step(lm.loss_fn, opt, micro_batches=micro, ema_decay=0.5)
        outs.append(f(state.create(params, opt, ema=True), batch, jax.random.key(0), ctx))
    (s1, m1), (s4, m4) = outs
    assert float(m1["loss"]) == pytest.approx(float(m4["loss"]), rel=1e-6)
    assert float(m1["grad_norm"]) == pytest.approx(float(m4["grad_norm"]), rel=1e-5)
    pairs = zip(
        jax.tree.leaves((s1.params, s1.ema_params)), jax.tree.leaves((s4.params, s4.ema_params)), strict=True
    )
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert int(s4.step) == 1
    with pytest.raises(ValueError, match="micro_batches=3"):
        step.grads_and_metrics(lm.loss_fn, params, batch, jax.random.key(0), ctx, micro_batches=3)


def test_train_step_reduces_loss_and_reports_norms():
    opt = optim.make_optimizer(optim_cfg(lr=3e-3), 30)
    s = state.create(model.init(CFG, jax.random.key(1)), opt, ema=False)
    f = step.make_train_step(lm.loss_fn, opt, lr_schedule=optim.make_schedule(optim_cfg(lr=3e-3), 30))
    batch, losses = lm_batch(seed=3), []
    for _ in range(15):
        s, m = f(s, batch, jax.random.key(0), step.Ctx(model_cfg=CFG))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.5
    for k in ("grad_norm", "param_norm", "update_norm", "lr", "accuracy"):
        assert np.isfinite(float(m[k])), k
    assert s.ema_params is None


def test_schedule_shapes():
    c = optim_cfg(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    sched = optim.make_schedule(c, 20)
    assert float(sched(0)) == pytest.approx(0.25)
    assert float(sched(3)) == pytest.approx(1.0)
    assert float(sched(4)) == pytest.approx(1.0)
    assert float(sched(20)) == pytest.approx(0.1, abs=1e-6)
    c.schedule = "linear"
    assert float(optim.make_schedule(c, 20)(12)) == pytest.approx(0.55)
    c.schedule = "constant"
    assert float(optim.make_schedule(c, 20)(19)) == pytest.approx(1.0)
    c.schedule = "exponential"
    with pytest.raises(ValueError, match="schedule"):
        optim.make_schedule(c, 20)


def test_weight_decay_mask_skips_vectors():
    mask = optim.decay_mask(model.param_shapes(model.ModelConfig.gpt2(d_model=32, n_heads=2)))
    assert mask["blocks"]["attn"]["wq"] and mask["blocks"]["mlp"]["w_in"] and mask["embed"]
    assert not mask["blocks"]["attn"]["bq"]  # [layers, H, E] but a bias
    assert not mask["blocks"]["attn_norm"]["scale"] and not mask["final_norm"]["bias"]
    assert not mask["blocks"]["mlp"]["b_in"]


def test_state_shardings_follow_params():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    opt = optim.make_optimizer(optim_cfg(), 10)
    ps = model.param_shardings(CFG, mesh)
    s = state.create(model.init(CFG, jax.random.key(0), mesh), opt, ema=True, param_shardings=ps, mesh=mesh)
    mu = [x for x in jax.tree.leaves(s.opt_state) if x.shape == s.params["blocks"]["mlp"]["w_in"].shape]
    assert mu and all(x.sharding.spec == ps["blocks"]["mlp"]["w_in"].spec for x in mu)
    assert s.ema_params["embed"].sharding.spec == ps["embed"].spec


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="unknown axis"):
        sharding.make_mesh({"model": 2})
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh({"data": 3, "fsdp": 2, "tensor": 1})
    assert sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 2}).shape["fsdp"] == 2


def test_indivisible_dims_are_replicated():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 8})
    spec = sharding.logical_to_spec(("vocab", "embed"), (259, 64), mesh)
    assert spec == jax.sharding.PartitionSpec(None, None)
