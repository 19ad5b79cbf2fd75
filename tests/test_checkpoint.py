"""Checkpoints: round trip with data position, keep-last-K, init_from across heads, named mismatch errors."""

import jax
import numpy as np
import pytest
from helpers import CHECKPOINT_CFG

from gptjax import checkpoint, model
from gptjax.model import sharding
from gptjax.train import defaults, optim, state

CFG = CHECKPOINT_CFG


def make_state(cfg=CFG, seed=0, mesh=None):
    opt = optim.make_optimizer(defaults.base_config("pretrain").optim, 10)
    params = model.init(cfg, jax.random.key(seed), mesh)
    ps = None if mesh is None else model.param_shardings(cfg, mesh)
    return state.create(params, opt, ema=True, param_shardings=ps, mesh=mesh)


def save(workdir, st, step, data_state=None, keep=3, cfg=CFG):
    mngr = checkpoint.manager(workdir, keep=keep)
    st = st.replace(step=st.step + step)
    checkpoint.save(mngr, st, data_state=data_state, meta=checkpoint.meta_for(cfg, "pretrain"))
    mngr.wait_until_finished()
    return mngr


def test_round_trip_restores_everything_sharded(tmp_path):
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    src = make_state(seed=0, mesh=mesh)
    mngr = save(str(tmp_path), src, 7, data_state={"epoch": 1, "offset": 42})
    target = make_state(seed=1, mesh=mesh)
    restored, data_state = checkpoint.restore(mngr, target)
    assert data_state == {"epoch": 1, "offset": 42}
    assert int(restored.step) == 7
    for a, b in zip(
        jax.tree.leaves((src.params, src.opt_state, src.ema_params)),
        jax.tree.leaves((restored.params, restored.opt_state, restored.ema_params)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    wq = restored.params["blocks"]["attn"]["wq"]
    assert wq.sharding.spec == target.params["blocks"]["attn"]["wq"].sharding.spec


def test_keeps_last_k(tmp_path):
    st = make_state()
    mngr = checkpoint.manager(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        checkpoint.save(
            mngr, st.replace(step=st.step + step), data_state={}, meta=checkpoint.meta_for(CFG, "x")
        )
    mngr.wait_until_finished()
    assert sorted(mngr.all_steps()) == [2, 3]


def test_load_model_and_meta(tmp_path):
    st = make_state()
    save(str(tmp_path), st, 5)
    cfg, params = checkpoint.load_model(str(tmp_path))
    assert cfg == CFG
    np.testing.assert_array_equal(params["embed"], st.params["embed"])
    step, meta = checkpoint.load_meta(str(tmp_path))
    assert step == 5 and meta["stage"] == "pretrain"


def test_init_from_lm_into_scalar_head(tmp_path):
    """A reward model starts from an SFT model: shared weights load, LM head ignored, value head fresh."""
    st = make_state()
    save(str(tmp_path), st, 3)
    rm_cfg = CFG.replace(head="scalar")
    fresh = model.init(rm_cfg, jax.random.key(9))
    with pytest.raises(ValueError, match="lm_head"):
        checkpoint.load_params(str(tmp_path), fresh)  # not allowed unless asked for
    loaded = checkpoint.load_params(str(tmp_path), fresh, allow_missing=("value_",), allow_extra=("lm_head",))
    np.testing.assert_array_equal(loaded["blocks"]["mlp"]["w_in"], st.params["blocks"]["mlp"]["w_in"])
    np.testing.assert_array_equal(loaded["value_head"], fresh["value_head"])
    assert "lm_head" not in loaded


def test_mismatch_error_names_the_parameter(tmp_path):
    save(str(tmp_path), make_state(), 1)
    other = CFG.replace(d_ff=96)
    with pytest.raises(ValueError, match=r"blocks/mlp/w_in: checkpoint has \(2, 32, 128\), model expects"):
        checkpoint.load_params(str(tmp_path), model.init(other, jax.random.key(0)))
    with pytest.raises(ValueError, match="blocks/mlp/w_out"):
        checkpoint.restore(checkpoint.manager(str(tmp_path)), make_state(other))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load_params(str(tmp_path / "empty"), model.init(CFG, jax.random.key(0)))


def test_init_from_refuses_an_architecture_that_shapes_cannot_show(tmp_path):
    """rope_theta, the norm and the activation change no shape: init_from names them (and the role)."""
    save(str(tmp_path), make_state(), 1)
    for field, value in (("rope_theta", 500000.0), ("norm_eps", 1e-6), ("mlp", "gelu")):
        other = CFG.replace(**{field: value}) if field != "mlp" else CFG.replace(mlp="gelu", d_ff=64)
        target = model.init(other, jax.random.key(0))
        with pytest.raises(ValueError, match=rf"role 'model'.*{field}: .* vs .*Set those model keys"):
            checkpoint.load_params(str(tmp_path), target, cfg=other)
    same = checkpoint.load_params(
        str(tmp_path), model.init(CFG, jax.random.key(1)), cfg=CFG.replace(max_len=16)
    )
    assert same["embed"].shape == (64, 32)
    with pytest.raises(ValueError, match=r"has no role 'policy'; it holds \['model'\]"):
        checkpoint.load_params(str(tmp_path), model.init(CFG, jax.random.key(1)), role="policy")
