"""PPO on ONE 80 GB GPU: a LoRA policy (OPT-13B shape) on an int8 frozen base, a 350M critic and reward model.

    python scripts/train.py --config configs/ppo_13b_lora.py:sft=runs/sft_13b,rm=runs/rm_350m,\
prompts=/data/prompts/*.jsonl,tokenizer=/ckpt/opt/tokenizer.json --workdir runs/ppo_13b_lora

DeepSpeed-Chat's single-GPU recipe (OPT-13B actor on one A100-80G) with LoRA; here the parts are:

- ``policy``: OPT-13B's shape (d 5120, 40 layers, 40 heads) from the SFT workdir (or an HF OPT-13B directory),
  trained as LoRA adapters of rank 64 on every projection (wq, wk, wv, wo, w_in, w_out; 0.24 B params, fp32
  with Adam and an EMA of 0.992); its frozen base held in int8 per output channel (``lora_base_quant``: 13 GB
  instead of 26 GB in bf16), dequantised one layer at a time in bf16; generation applies the adapters on
  the base as held (``rollout.lora_generation='adapters'``: no copy of the 13B weights).
- ``ref``: the policy's base with the adapters off: the same int8 arrays, no second copy (``Ctx.aliases``).
- ``value``: the 350M reward model's shape (``configs/rm_350m.py``) trained in full (fp32 + Adam), started
  from the RM (the RM-initialised critic); ``reward``: the frozen RM.
- InstructGPT's PPO settings otherwise (clip 0.2, KL beta 0.02, gamma 1, lambda 0.95, 1 epoch), with a
  smaller rollout (128 prompts, minibatches of 32 in 16 micro-batches of 2) and no PPO-ptx (its 8
  pretraining rows per RL row would not fit beside the rest on one device).

Memory: ``python scripts/plan.py --config configs/ppo_13b_lora.py --devices 1 --device_memory_gb 80`` plans
every program of the iteration on one device (numbers below). The planner compiles for the host's backend:
on a CPU host XLA may keep bf16 matmul temporaries in fp32, so its peaks are an upper bound of what a GPU
compile needs (a GPU host's plan is the real one). The plan on a 2-core CPU host (about 2 minutes):

    | (per device)                 | update   | generate | score    |
    |------------------------------|----------|----------|----------|
    | trained parameters           | 0.592 B (adapters 0.236 B + critic 0.355 B) |
    | params + optimizer + EMA     | 7.49 GiB | 7.49 GiB | 7.49 GiB |
    | frozen roles (int8 base, RM) | 14.06 GiB| 14.06 GiB| 14.06 GiB|
    | activations and temporaries  | 8.13 GiB | 41.38 GiB| 2.70 GiB |
    | KV cache (32 rows a call)    |          | 12.50 GiB|          |
    | peak                         | 29.68 GiB| 62.93 GiB| 31.70 GiB|

Without quantisation (``--config.roles.policy.model.lora_base_quant=''``) the base is held in the param
dtype: 26 GB of block weights in bf16 (``param_dtype='bfloat16'``, adapters and Adam in bf16 too), 52 GB in
fp32, where int8 holds 13 GB.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from gptjax.model import ModelConfig
from gptjax.train import defaults

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_in", "w_out")


def policy_model() -> ModelConfig:
    """OPT-13B's shape: LoRA adapters on an int8 base, bf16 compute, full remat."""
    return ModelConfig.opt(
        d_model=5120,
        n_layers=40,
        n_heads=40,
        head="lm",
        dtype="bfloat16",
        param_dtype="float32",
        remat="full",
        lora_rank=64,
        lora_alpha=128.0,
        lora_targets=LORA_TARGETS,
        lora_base_quant="int8",
    )


def critic_model() -> ModelConfig:
    """The 350M reward model's shape (configs/rm_350m.py), trained in full."""
    return ModelConfig.opt(
        d_model=1024,
        n_layers=24,
        n_heads=16,
        head="scalar",
        dtype="bfloat16",
        param_dtype="float32",
        remat="full",
    )


def get_config(arg: str | None = None):
    args = defaults.parse_arg(arg, {"sft": "", "rm": "", "prompts": "", "tokenizer": ""})
    c = defaults.base_config("ppo")
    c.mesh = ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    c.data = defaults.own_data("prompts", args["prompts"], args["tokenizer"])

    def optim(lr: float, ema: float = 0.0) -> ConfigDict:
        o = c.optim.copy_and_resolve_references()
        o.update(lr=lr, warmup_steps=10, schedule="constant", ema_decay=ema)
        return o

    c.roles = ConfigDict(
        {
            # LoRA's usual learning rate is ~10x full fine-tuning's (DeepSpeed-Chat: 5e-4 for LoRA params)
            "policy": defaults.trained_role(policy_model(), optim(1e-4, ema=0.992), args["sft"]),
            "value": defaults.trained_role(critic_model(), optim(5e-6), args["rm"]),
        }
    )
    c.frozen = ConfigDict(
        {"ref": defaults.frozen_role(args["sft"]), "reward": defaults.frozen_role(args["rm"])}
    )
    c.rollout = defaults.rollout_section()
    c.rollout.update(
        batch_size=128, prompt_len=256, max_new_tokens=256, epochs=1, generate_rows=32, score_rows=8
    )
    c.ptx = defaults.ptx_section(None, 0.0, 512)
    c.train.update(
        batch_size=32,  # the PPO minibatch
        micro_batches=16,
        seq_len=c.rollout.prompt_len + c.rollout.max_new_tokens,
        steps=1280,  # 320 rollouts of 128 prompts
        checkpoint_every=40,
        log_every=4,
    )
    del c.optim  # each role has its own
    c.lock()
    return c
