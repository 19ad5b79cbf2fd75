"""LoRA in the multi-role stages: a LoRA policy's reference is its base with the adapters off (the same
arrays, bitwise what a separate load gives), only adapters are trained, checkpointed and averaged (EMA),
LoRA-PPO resumes bitwise, generation with the adapters applied equals generation from merged weights, DPO
and GRPO train LoRA policies, and the export merges the adapters into an HF directory."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_same_models, killed_after, random_params, rl_model_cfg, tiny_config

from gptjax import checkpoint, model, train
from gptjax.interop import hf, lora
from gptjax.model import sample, sharding
from gptjax.rl import policy as policy_lib
from gptjax.train import build, defaults

LORA = {"lora_rank": 4, "lora_alpha": 8.0, "lora_targets": ("wq", "wv", "w_in")}


def lora_ppo_config(sft, rm, steps, value_lora=True, **over):
    c = defaults.load_config(f"configs/tiny.py:stage=ppo,sft={sft},rm={rm}")
    c.unlock()
    c.roles.policy.model = defaults.model_section(rl_model_cfg(**LORA))
    value = rl_model_cfg("scalar", **LORA) if value_lora else rl_model_cfg("scalar")
    c.roles.value.model = defaults.model_section(value)
    c.roles.policy.optim.update(lr=3e-3, ema_decay=0.9)
    c.roles.value.optim.lr = 3e-3
    c.rollout.update(batch_size=16, max_new_tokens=8, epochs=1)
    c.train.update(batch_size=8, seq_len=24, steps=steps, checkpoint_every=1, log_every=1, **over)
    return c


def leaf_names(tree):
    return [
        "/".join(str(getattr(k, "key", k)) for k in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(tree)
    ]


def test_a_lora_policys_reference_is_its_base_adapters_off_with_no_second_copy(rl_base):
    sft, rm = rl_base
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    with jax.set_mesh(mesh):
        run = build.build(lora_ppo_config(sft, rm, 2), mesh, source=False)
    ctx = run.ctx
    assert ctx.aliases == (("ref", "policy"),) and "ref" not in ctx.frozen
    base = ctx.frozen["base"]["policy"]
    ref = ctx.frozen_params("ref")
    # the very arrays of the policy's base: nothing loaded twice
    assert all(a is b for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(base), strict=True))
    # bitwise the SFT model loaded on its own
    _, separate = checkpoint.load_model(sft)
    assert leaf_names(ref) == leaf_names(separate)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(separate), strict=True):
        np.testing.assert_array_equal(a, b)
    assert ctx.cfg_of("ref").lora_rank == 0 and ctx.cfg_of("policy").lora_rank == 4
    # only adapters train (and the value role's scalar head); the EMA mirrors the policy's adapters
    policy_names, value_names = leaf_names(run.state.params["policy"]), leaf_names(run.state.params["value"])
    assert policy_names and all(n.endswith(("_lora_a", "_lora_b")) for n in policy_names)
    assert {"value_head", "value_bias"} <= set(value_names)
    assert all(n.endswith(("_lora_a", "_lora_b")) for n in value_names if not n.startswith("value_"))
    assert leaf_names(run.state.ema_params["policy"]) == policy_names
    # the reference's logits, as the experience pass computes them, are the separate model's (its own
    # config: another layer loop, so float rounding may differ)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 250, (2, 12)), jnp.int32)
    params = policy_lib.experience_params(ctx, run.state.params, ("policy", "ref"))
    ref_logits = model.apply(ctx.cfg_of("ref"), params["ref"], tokens)
    sft_cfg = model.config_from_dict(checkpoint.load_meta(sft)[1]["model"])
    np.testing.assert_allclose(ref_logits, model.apply(sft_cfg, separate, tokens), atol=1e-5)
    # fresh adapters (B = 0): the policy is its reference
    np.testing.assert_allclose(
        model.apply(ctx.cfg_of("policy"), params["policy"], tokens), ref_logits, atol=1e-6
    )


def test_lora_ppo_trains_adapters_resumes_bitwise_and_exports_merged(rl_base, tmp_path):
    sft, rm = rl_base
    whole = str(tmp_path / "whole")
    train.run(lora_ppo_config(sft, rm, 4), whole)  # 2 rollouts x 2 minibatches, a checkpoint a step
    saved = checkpoint.store._saved_param_shapes(checkpoint.manager(whole, create=False), 4)
    assert saved and all(n.endswith(("_lora_a", "_lora_b", "value_head", "value_bias")) for n in saved), saved
    rows = [json.loads(line) for line in open(os.path.join(whole, "metrics.jsonl"))]
    rollouts = [r for r in rows if r["split"] == "rollout"]
    assert abs(rollouts[0]["kl"]) < 1e-6  # the first rollout's policy is its base: KL to the reference 0
    assert rollouts[1]["kl"] != 0.0
    # killed after step 2, at the end of the first rollout (inside a rollout: tests/test_ppo.py): same end
    split = killed_after(whole, tmp_path / "split2", 2)
    train.run(lora_ppo_config(sft, rm, 4), split)
    assert_same_models(whole, split, (("policy", False), ("value", False), ("policy", True)), "resumed at 2")
    # load_model: the adapters on the SFT base; the base itself untouched; the EMA trails the policy
    _, start = checkpoint.load_model(sft)
    cfg, pol = checkpoint.load_model(whole, role="policy")
    _, ema = checkpoint.load_model(whole, role="policy", ema=True)
    adapters, base = lora.split(pol)
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(start), strict=True):
        np.testing.assert_array_equal(a, b)
    moved = lambda p: float(optax.tree.norm(lora.split(p)[0]))  # the adapters' distance from B = 0 ...
    assert 0 < moved(ema) < moved(pol)
    # the export merges the adapters: an HF directory that computes the LoRA policy's logits
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "convert_hf.py")
    spec = importlib.util.spec_from_file_location("convert_hf", script)
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    convert.main(
        ["--to-hf", str(tmp_path / "hf"), "--from", whole, "--role", "policy", "--tokenizer", "byte"]
    )
    hcfg, hparams = hf.load(str(tmp_path / "hf"))
    assert hcfg.lora_rank == 0
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, 250, (2, 10)), jnp.int32)
    np.testing.assert_allclose(model.apply(hcfg, hparams, tokens), model.apply(cfg, pol, tokens), atol=2e-5)


def test_generation_with_adapters_applied_equals_generation_from_merged_weights():
    cfg = rl_model_cfg(**LORA)
    params = random_params(cfg, 0)  # B != 0: adapters that change the model
    adapters, base = lora.split(params)
    adapters = jax.tree.map(lambda x: x * 4.0, adapters)
    params = lora.combine(adapters, base)
    prompts = jnp.asarray(np.random.default_rng(2).integers(3, 250, (4, 6)), jnp.int32)
    out = {}
    for mode in policy_lib.GENERATION_MODES:
        gcfg = policy_lib.generation_config(cfg, mode)
        gparams = policy_lib.generation_params(cfg, params, mode)
        assert (gcfg.lora_rank == 0) == (mode == "merged")
        assert any(n.endswith("_lora_a") for n in leaf_names(gparams)) == (mode == "adapters")
        out[mode] = sample.generate(
            gcfg, gparams, prompts, jax.random.key(0), max_new_tokens=8, temperature=1.0, return_info=True
        )
    np.testing.assert_array_equal(out["adapters"].tokens_BT, out["merged"].tokens_BT)
    np.testing.assert_allclose(out["adapters"].logprobs_BT, out["merged"].logprobs_BT, atol=1e-5)
    with pytest.raises(ValueError, match="lora_generation"):
        policy_lib.generation_config(cfg, "fused")


def test_lora_dpo_reference_is_the_base_and_starts_at_log_2(tmp_path, sft):
    c = tiny_config(
        "dpo", **{"train.steps": 3, "train.init_from": sft, "optim.lr": 1e-2, "train.log_every": 1}
    )
    c.model.update(**LORA)
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    with jax.set_mesh(mesh):
        run = build.build(c, mesh, source=False)
    assert run.ctx.aliases == (("ref", "model"),) and "ref" not in run.ctx.frozen
    assert all(
        a is b
        for a, b in zip(
            jax.tree.leaves(run.ctx.frozen_params("ref")),
            jax.tree.leaves(run.ctx.frozen["base"]),
            strict=True,
        )
    )
    train.run(c, str(tmp_path / "dpo"))
    rows = [json.loads(line) for line in open(tmp_path / "dpo" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    # at step 1 the policy is its reference: every margin is 0 and the loss is -log sigmoid(0)
    assert losses[0] == pytest.approx(np.log(2.0), abs=1e-5)
    assert losses[-1] < losses[0]


def test_lora_grpo_with_an_int8_base_trains_and_its_reference_is_that_base(rl_base, tmp_path):
    sft, rm = rl_base
    c = defaults.load_config(f"configs/tiny.py:stage=grpo,sft={sft},rm={rm}")
    c.unlock()
    c.roles.policy.model = defaults.model_section(rl_model_cfg(**LORA, lora_base_quant="int8"))
    c.roles.policy.optim.lr = 3e-3
    c.rollout.update(batch_size=16, samples_per_prompt=4, max_new_tokens=8, epochs=1)
    c.train.update(batch_size=8, seq_len=24, steps=2, checkpoint_every=2, log_every=1)
    workdir = str(tmp_path / "grpo")
    train.run(c, workdir)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rollouts = [r for r in rows if r["split"] == "rollout"]
    assert abs(rollouts[0]["kl"]) < 1e-6 and len(rollouts) == 1
    assert all(np.isfinite(r["loss"]) for r in rows if r["split"] == "train")
    # the run comes back on the weights it trained on: the base's int8 weights, dequantised
    cfg, params = checkpoint.load_model(workdir, role="policy")
    _, start = checkpoint.load_model(sft)
    base = lora.split(params)[1]
    w, w0 = base["blocks"]["attn"]["wq"], start["blocks"]["attn"]["wq"]
    err = float(jnp.max(jnp.abs(w - w0)))
    assert 0 < err <= float(jnp.max(jnp.abs(w0))) / 127 + 1e-6  # within half a step of int8 per channel
    np.testing.assert_array_equal(base["embed"], start["embed"])  # embeddings stay as they are
