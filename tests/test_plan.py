"""The ahead-of-time planner: compiler numbers for an abstract sharded train step, fused attention
footprint and the script's verdict."""

import os
import subprocess
import sys

import jax
import pytest
from helpers import ROOT, script_env

from gptjax import model
from gptjax.model import sharding
from gptjax.research import plan as plan_lib
from gptjax.train import defaults, roles


def run_plan_script(*args: str) -> subprocess.CompletedProcess:
    """scripts/plan.py in its own process (it sets the device count before JAX starts)."""
    env = script_env()
    script = os.path.join(ROOT, "scripts", "plan.py")
    return subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def small_gpt2(stage="pretrain", seq_len=512, batch=16):
    """configs/gpt2_124m.py cut to 2 layers of d 256 (fast to compile), FSDP over the 8 test devices."""
    c = defaults.load_config(f"configs/gpt2_124m.py:stage={stage}")
    c.unlock()
    c.model.update(n_layers=2, d_model=256, n_heads=4, vocab_size=4096)
    c.train.update(batch_size=batch, seq_len=seq_len, micro_batches=1)
    return c


def test_plan_reads_the_compilers_memory_and_model_flops():
    c = small_gpt2()
    p = plan_lib.plan(c, device_memory_gb=80, mfu=0.5, peak_flops_per_device=1e15)
    n_params = model.num_params(model.config_from_dict(c.model.to_dict()))
    assert p.devices == 8 and p.params == n_params
    # fp32 params split 8 ways; Adam's two moments triple that
    assert p.param_bytes_per_device == pytest.approx(n_params * 4 / 8, rel=0.05)
    assert p.state_bytes_per_device == pytest.approx(3 * p.param_bytes_per_device, rel=0.05)
    assert p.peak_bytes_per_device > p.state_bytes_per_device and p.temp_bytes_per_device > 0
    assert p.fits
    tokens = 16 * 512
    flops = model.flops_per_token(model.config_from_dict(c.model.to_dict()), 512) * tokens / 8
    assert p.flops_per_device == pytest.approx(flops)
    assert p.step_seconds == pytest.approx(flops / (0.5 * 1e15))
    assert "| device memory | 80 GiB: fits |" in plan_lib.table(p, "small")


def test_fused_attention_is_planned_without_the_scores():
    """Planned with the fused kernels' footprint, the [B, H, L, L] scores kept for the backward are gone."""
    L = 1024
    c = small_gpt2(seq_len=L, batch=2)
    one = jax.devices()[:1]
    fused = plan_lib.plan(c, device_memory_gb=80, devices=one)
    reference = plan_lib.plan(c, device_memory_gb=80, fused_attention=False, devices=one)
    scores_per_layer = 2 * 4 * L * L * 4  # 2 rows, 4 heads, fp32 (the reference keeps 5/8 of them, 2 layers)
    assert reference.temp_bytes_per_device - fused.temp_bytes_per_device >= scores_per_layer
    assert not any(f",{L},{L}]" in what or f"{L},{L}," in what for what, _ in fused.biggest)


def test_plan_of_a_reward_model_stage():
    c = defaults.load_config("configs/rm_350m.py")
    c.unlock()
    c.model.update(n_layers=2, d_model=256, n_heads=4, vocab_size=4096)
    c.data.num_responses = 4
    c.train.update(batch_size=8, seq_len=256, micro_batches=1)
    p = plan_lib.plan(c, device_memory_gb=80)
    assert p.fits and p.flops_per_device > 0
    c.model.lora_rank = 4  # LoRA: the adapters and the head train; the base is frozen, beside the state
    lora_plan = plan_lib.plan(c, device_memory_gb=80)
    lora_trained = 2 * 2 * (256 * 4 + 4 * 256) + 256 + 1  # wq, wv: A [D, R] + B [R, D] per layer; the head
    assert lora_plan.params == lora_trained < p.params / 100
    assert lora_plan.state_bytes_per_device < p.state_bytes_per_device / 20
    assert lora_plan.frozen_bytes_per_device >= p.param_bytes_per_device - 257 * 4
    c.model.lora_rank = 0
    c.train.micro_batches = 3  # 8 rows do not split into 3 micro-batches over 8 devices: train.py refuses it
    with pytest.raises(ValueError, match="micro_batches"):
        plan_lib.plan(c, device_memory_gb=80)


def test_plan_script_names_the_biggest_consumers_when_it_does_not_fit():
    done = run_plan_script(
        *("--config", "configs/gpt2_124m.py", "--devices", "2"),
        *("--device_memory_gb", "4", "--config.model.n_layers=2"),
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "| devices (mesh) | 2 (data 1, fsdp 2, tensor 1) |" in done.stdout
    assert "DOES NOT FIT" in done.stdout and "DOES NOT FIT (pretrain): peak" in done.stderr
    assert "GiB  f32[" in done.stderr or "GiB  bf16[" in done.stderr  # a named consumer with its shape
    assert jax.device_count() == 8  # the script ran in its own process


def test_llama_1b_preset_plans_to_fit_eight_80gb_devices():
    """configs/llama_1b.py on its stated hardware: the real shapes, FSDP over the 8 test devices."""
    p = plan_lib.plan(defaults.load_config("configs/llama_1b.py"), device_memory_gb=80)
    assert p.devices == 8 and p.fits, plan_lib.table(p, "llama_1b")
    # activations are split by batch: no temporary holds the global batch of 256 sequences
    assert not any("256,4096" in what for what, _ in p.biggest), p.biggest


def test_gpt2_124m_preset_plans_to_fit_one_80gb_device():
    done = run_plan_script("--config", "configs/gpt2_124m.py", "--devices", "1")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "| device memory | 80 GiB: fits |" in done.stdout


def test_llama_8b_preset_plans_to_fit_eight_80gb_devices():
    p = plan_lib.plan(defaults.load_config("configs/llama_8b.py"), device_memory_gb=80)
    assert p.devices == 8 and p.fits, plan_lib.table(p, "llama_8b")
    assert 7.9e9 < p.params < 8.1e9


def test_dpo_plan_holds_the_frozen_reference():
    """DPO's plan holds a frozen copy of the model (the reference) beside the train state; SFT's not."""

    def held(stage):  # what lives outside the temporaries: arguments + outputs - donated
        c = defaults.load_config(f"configs/tiny.py:stage={stage}")
        c.unlock()
        if stage == "dpo":
            c.data.num_responses = 2
        p = plan_lib.plan(c, device_memory_gb=80)
        return p.peak_bytes_per_device - p.temp_bytes_per_device, p

    dpo, p = held("dpo")
    sft, _ = held("sft")
    assert dpo >= p.state_bytes_per_device + 0.99 * p.param_bytes_per_device
    assert sft < p.state_bytes_per_device + 0.5 * p.param_bytes_per_device


def small_ppo(generate_rows=0, dtype="float32"):
    """configs/ppo_13b.py with 2-layer roles (fast to compile); its rollout layout (data 2 x tensor 4)."""
    c = defaults.load_config("configs/ppo_13b.py")
    c.unlock()
    for name in ("policy", "value"):
        c.roles[name].model.update(n_layers=2, d_model=256, n_heads=8, vocab_size=4096, dtype=dtype)
    c.rollout.update(batch_size=64, prompt_len=64, max_new_tokens=64, generate_rows=generate_rows)
    c.ptx.ratio, c.loss.ptx_coef = 0, 0.0
    c.train.update(batch_size=16, micro_batches=1, seq_len=128)
    return c


def test_ppo_rollout_plan_holds_the_kv_cache_beside_the_resident_train_state():
    whole = plan_lib.plan_rollout(small_ppo(), device_memory_gb=80)
    halves = plan_lib.plan_rollout(small_ppo(generate_rows=32), device_memory_gb=80)
    gen = whole["generate"]
    assert gen.mesh == {"data": 2, "fsdp": 1, "tensor": 4}  # the rollout layout
    # k and v: 2 layers x 64 rows x 128 slots x 8 heads x 32 dims x 4 bytes; rows over data 2, heads over
    # tensor 4
    assert gen.kv_cache_bytes_per_device == 2 * 2 * 64 * 128 * 8 * 32 * 4 / (2 * 4)
    assert halves["generate"].kv_cache_bytes_per_device == gen.kv_cache_bytes_per_device / 2
    # generating in two calls frees at least half the cache; the update layout's state stays resident
    freed = gen.temp_bytes_per_device - halves["generate"].temp_bytes_per_device
    assert freed >= 0.99 * gen.kv_cache_bytes_per_device / 2
    for p in (*whole.values(), *halves.values()):
        assert p.peak_bytes_per_device >= p.state_bytes_per_device + p.frozen_bytes_per_device
        assert p.fits
    # twice the calls: twice the weight reads for the same tokens
    assert halves["generate"].step_seconds > gen.step_seconds
    assert whole["score"].mesh == {"data": 1, "fsdp": 8, "tensor": 1}  # scored in the update layout
    assert whole["score"].flops_per_device > gen.flops_per_device  # four roles' forward passes vs one
    assert "| KV cache per device (in its dtype) |" in plan_lib.table(whole, "ppo")


def test_ppo_13b_preset_plans_to_fit_eight_80gb_devices():
    """The PPO update: policy and critic with Adam and EMA, frozen reference and reward model, 64 RL rows
    plus 512 PPO-ptx rows a minibatch in 8 micro-batches; and the rollout (generation of 512 prompts in
    calls of 256 in the rollout layout, the experience pass) beside the resident train state."""
    config = defaults.load_config("configs/ppo_13b.py")
    p = plan_lib.plan(config, device_memory_gb=80)
    assert p.devices == 8 and p.fits, plan_lib.table(p, "ppo_13b")
    assert 13.1e9 < p.params < 13.3e9  # OPT-13B-shaped policy + 350M-class critic
    assert p.frozen_bytes_per_device > 0.9 * p.param_bytes_per_device  # reference + reward model
    rollout = plan_lib.plan_rollout(config, device_memory_gb=80)
    assert all(q.fits for q in rollout.values()), plan_lib.table(rollout, "ppo_13b")


def test_ppo_1b_preset_plans_to_fit_one_80gb_device():
    done = run_plan_script("--config", "configs/ppo_1b.py", "--devices", "1")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "| device memory | 80 GiB: fits |" in done.stdout


def test_group_objectives_plan_without_a_critic():
    """GRPO and RLOO: the policy alone trains (no critic, its Adam state or EMA), the experience batch carries
    the reference's log-probs instead of values and returns, and the experience pass runs three roles."""
    plans = {}
    for stage in ("ppo", "grpo"):
        c = defaults.load_config(f"configs/tiny.py:stage={stage}")
        plans[stage] = (plan_lib.plan(c, device_memory_gb=80), plan_lib.plan_rollout(c, device_memory_gb=80))
    (ppo, ppo_rollout), (grpo, grpo_rollout) = plans["ppo"], plans["grpo"]
    section = defaults.load_config("configs/tiny.py:stage=ppo").roles
    lm, scalar = (roles.model_config(section[name].model) for name in ("policy", "value"))
    assert grpo.params == model.num_params(lm)
    assert ppo.params == model.num_params(lm) + model.num_params(scalar)
    assert grpo.state_bytes_per_device < ppo.state_bytes_per_device
    assert grpo.fits and all(p.fits for p in grpo_rollout.values())
    # the reference, and the reward model with the policy's shapes and a scalar head (no critic to copy)
    frozen = model.num_params(lm) + model.num_params(lm.replace(head="scalar"))
    assert grpo.frozen_bytes_per_device / grpo.param_bytes_per_device == pytest.approx(
        frozen / model.num_params(lm), rel=0.02
    )
    assert grpo_rollout["score"].flops_per_device < ppo_rollout["score"].flops_per_device
    rloo = defaults.load_config("configs/tiny.py:stage=rloo")
    batch = plan_lib.abstract_batch(rloo, "rloo", sharding.make_mesh(rloo.mesh))
    assert {"ref_logp_BL", "advantages_BL", "old_logp_BL"} <= set(batch)
    assert "old_values_BL" not in batch and "returns_BL" not in batch


def test_ppo_13b_lora_preset_plans_its_int8_base_once_on_one_device():
    """configs/ppo_13b_lora.py, cut to 2 of its 40 layers (the whole plan: README / the config's docstring):
    on one device the LoRA policy's state is its adapters, the frozen roles hold the int8 base once (the
    reference is that base) and the reward model, and every program of the iteration fits."""
    c = defaults.load_config("configs/ppo_13b_lora.py")
    c.unlock()
    c.roles.policy.model.n_layers = 2
    c.rollout.update(batch_size=32, generate_rows=8)
    c.train.update(batch_size=8, micro_batches=4)
    one = jax.devices()[:1]
    update, rollout = plan_lib.plan(c, 80, devices=one), plan_lib.plan_rollout(c, 80, devices=one)
    d, layers, rank, vocab = 5120, 2, 64, 50272
    adapters = layers * rank * (4 * (d + d) + (d + 4 * d) + (4 * d + d))  # wq wk wv wo, w_in, w_out: A + B
    critic = model.num_params(roles.model_config(c.roles.value.model))
    assert update.params == adapters + critic
    assert update.devices == 1 and update.fits and all(p.fits for p in rollout.values())
    # the base's block weights at 1 byte each (int8, + an fp32 scale per output channel), the embedding and
    # learned positions in fp32, the reward model in fp32; the reference adds nothing (an fp32 base: +3 bytes
    # a block weight; a second copy: the whole base again)
    block_weights = layers * 12 * d * d
    embed = (vocab + 2050) * d * 4  # OPT: token and learned positions (2048 + 2), fp32
    held = block_weights + embed + 4 * critic
    assert held < update.frozen_bytes_per_device < held + 0.01 * block_weights
