"""The model config from the checkpoint a run starts from (``model.from_checkpoint``): a Hugging Face dir
or a workdir supplies the architecture, read before any weight exists; model keys set by hand must agree
with it, every disagreement named in one error; without it, a config that cannot take the checkpoint's
weights is refused the same way, before anything is initialised."""

import jax
import numpy as np
import pytest
import torch
import transformers
from helpers import save_workdir, tiny_config

from gptjax import checkpoint
from gptjax import model as M
from gptjax.interop import hf
from gptjax.train import roles, stages


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    """A tiny random Qwen3 (q / k norms, sliding-window layers) saved by transformers."""
    path = tmp_path_factory.mktemp("hf") / "qwen3"
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3Config(
        vocab_size=300,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        rope_theta=1e6,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
        tie_word_embeddings=True,
    )
    transformers.Qwen3ForCausalLM(hf_cfg).save_pretrained(path)
    return str(path)


@pytest.fixture
def no_init(monkeypatch):
    """Any weight initialisation fails the test: what is checked here happens before it."""

    def refuse(*a, **k):
        raise AssertionError("model.init was called")

    monkeypatch.setattr(M, "init", refuse)


def sft_config(init_from, **model_keys):
    c = tiny_config("sft", **{"train.init_from": init_from})
    c.model.update(**model_keys)
    return c


def test_architecture_comes_from_a_hugging_face_directory(qwen3_dir, no_init):
    c = sft_config(qwen3_dir, from_checkpoint=True, dtype="bfloat16", remat="full")
    (role,) = roles.trained_roles(c, stages.of_config(c))
    ckpt = checkpoint.load.checkpoint_model_config(qwen3_dir)
    for f in M.CHECKPOINT_FIELDS:
        if f != "max_len":
            assert getattr(role.cfg, f) == getattr(ckpt, f), f
    assert role.cfg.family == "qwen3" and role.cfg.qk_norm and role.cfg.layer_windows == (0, 8, 8)
    # The config's own settings: numerics, remat, and a rotary model's context (the run's, not 4096).
    assert (role.cfg.dtype, role.cfg.remat, role.cfg.max_len) == ("bfloat16", "full", c.model.max_len)
    assert not role.cfg.from_checkpoint


def test_weights_load_into_the_resolved_config(qwen3_dir, no_init):
    c = sft_config(qwen3_dir, from_checkpoint=True)
    (role,) = roles.trained_roles(c, stages.of_config(c))
    # What init_from does after model.init (its arrays' shapes are all it reads), with the same checks.
    params = checkpoint.load_params(qwen3_dir, M.param_shapes(role.cfg), cfg=role.cfg)
    _, want = hf.load(qwen3_dir)
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_a_config_that_cannot_take_the_weights_is_one_error(qwen3_dir, no_init):
    c = sft_config(qwen3_dir)  # tiny.py's own model, not the checkpoint's
    with pytest.raises(ValueError) as e:
        roles.trained_roles(c, stages.of_config(c))
    msg = str(e.value)
    for field in ("vocab_size", "d_model", "n_layers", "kv_heads", "mlp", "qk_norm", "layer_windows"):
        assert f"{field}: " in msg, field
    assert "--config.model.from_checkpoint=True" in msg


def test_command_line_keys_must_agree_with_the_checkpoint(qwen3_dir, no_init):
    c = sft_config(qwen3_dir, from_checkpoint=True)
    agreeing = {"model.d_model": 48, "model.n_kv_heads": 2, "model.dtype": "bfloat16", "model.max_len": 64}
    roles.check_model_overrides(c, agreeing)  # no error: they match, or are the run's own settings
    with pytest.raises(ValueError) as e:
        roles.check_model_overrides(
            c, {**agreeing, "model.n_layers": 2, "model.norm_eps": 1e-5, "model.mlp": "gelu"}
        )
    msg = str(e.value)
    assert msg.count("but the checkpoint has") == 3, msg
    assert "--config.model.n_layers=2, but the checkpoint has 3" in msg and "--config.model.mlp='gelu'" in msg
    assert "d_model" not in msg and "dtype" not in msg


def test_a_workdir_role_supplies_a_named_roles_architecture(tmp_path, no_init):
    """A run with named roles (GRPO's policy) starting from one role of a workdir."""
    gemma = M.ModelConfig.gemma2(vocab_size=300, d_model=32, n_layers=2, n_heads=2, head_dim=16, d_ff=64)
    other = M.ModelConfig.llama(vocab_size=300, d_model=32, n_layers=1, n_heads=2)
    shapes = {n: M.param_shapes(cfg) for n, cfg in (("policy", gemma), ("value", other))}
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    ckpt = save_workdir(tmp_path / "ppo", "ppo", params, roles={"policy": gemma, "value": other})
    c = tiny_config("grpo")
    c.roles.policy.update(init_from=ckpt, init_role="policy")
    c.roles.policy.model.from_checkpoint = True
    (role,) = roles.trained_roles(c, stages.of_config(c))
    assert (
        role.cfg.family == "gemma2" and role.cfg.layer_windows == (4096, 0) and role.cfg.final_softcap == 30.0
    )
    with pytest.raises(ValueError, match=r"--config.roles.policy.model.post_norms=False, but the checkpoint"):
        roles.check_model_overrides(c, {"roles.policy.model.post_norms": False})
    c.roles.policy.init_from = ""
    with pytest.raises(ValueError, match="from_checkpoint=True but the role has no init_from"):
        roles.trained_roles(c, stages.of_config(c))
