"""PPO-ptx on a 13B policy (OPT-13B shape) with a 350M-class reward model and an RM-initialised critic.

    python scripts/train.py --config configs/ppo_13b.py:sft=runs/sft_13b,rm=runs/rm_350m,\
prompts=/data/prompts/*.jsonl,ptx=/data/pretrain/*.jsonl,tokenizer=/ckpt/opt/tokenizer.json \
--workdir runs/ppo_13b

Roles: ``policy`` (trained, from the SFT workdir or an HF OPT-13B directory), ``value`` (trained, from the
reward model's workdir: the RM-initialised critic), ``ref`` (frozen SFT) and ``reward`` (frozen, normalised
RM, ``configs/rm_350m.py``). InstructGPT's settings (docs/references.md): rollouts of 512 prompts, minibatches
of 64, 1 PPO epoch, clip 0.2, KL beta 0.02 per token, gamma 1, lambda 0.95, EMA 0.992 of the policy, and PPO-
ptx with coefficient 27.8 on 8 pretraining sequences per RL sequence. Learning rates are DeepSpeed-Chat's for
this pair (policy 9.65e-6, critic 5e-6), constant after a short warmup.

Hardware (``mesh`` below): 8 x 80 GB GPUs: FSDP over all 8 for the update; rollouts decode with the weights
tensor-parallel over the 4 GPUs of an NVLink pair group and the batch split in two (``rollout.mesh``), the
policy moved between the layouts on device every rollout. TPU: a v5p-32 / v4-32 slice with
``--config.mesh.fsdp=-1`` (16 chips) and ``--config.rollout.mesh.data=4`` (tensor 4 within a host's chips).
Memory: the policy's fp32 params + Adam + EMA are ~210 GB, the frozen bf16 reference 26 GB, sharded over the
8 GPUs; ``python scripts/plan.py --config configs/ppo_13b.py --devices 8`` plans the update at 58 GiB per
device (policy remat 'full'; 'dots_no_batch' needs 85 GiB), and the rollout: generation in 2 calls of 256
prompts at 77 GiB per device (the train state stays resident; one call of 512 plans 105 GiB), the experience
pass at 33 GiB.
Expected: the RM reward rises while the KL to the reference grows to a few nats per response; compare with
DeepSpeed-Chat's step 3 (OPT-13B: ~435 tokens/s per A100-40G on 8 GPUs).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from gptjax.model import ModelConfig
from gptjax.train import defaults


def opt(d_model: int, n_layers: int, n_heads: int, head: str, remat: str = "dots_no_batch") -> ModelConfig:
    """An OPT shape in bf16 compute on fp32 params, with the update's activation remat."""
    return ModelConfig.opt(
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        head=head,
        dtype="bfloat16",
        param_dtype="float32",
        remat=remat,
    )


def get_config(arg: str | None = None):
    args = defaults.parse_arg(arg, {"sft": "", "rm": "", "prompts": "", "ptx": "", "tokenizer": ""})
    c = defaults.base_config("ppo")
    c.mesh = ConfigDict({"data": 1, "fsdp": 8, "tensor": 1})
    c.data = defaults.own_data("prompts", args["prompts"], args["tokenizer"])

    def optim(lr: float, ema: float = 0.0) -> ConfigDict:
        o = c.optim.copy_and_resolve_references()
        o.update(lr=lr, warmup_steps=10, schedule="constant", ema_decay=ema)
        return o

    c.roles = ConfigDict(
        {
            # full remat: each minibatch carries 8 pretraining rows per RL row (PPO-ptx), and only 8
            # micro-batches split 64 rows over 8 devices (scripts/plan.py: 58 GiB per device)
            "policy": defaults.trained_role(
                opt(5120, 40, 40, "lm", remat="full"), optim(9.65e-6, ema=0.992), args["sft"]
            ),
            "value": defaults.trained_role(opt(1024, 24, 16, "scalar"), optim(5e-6), args["rm"]),
        }
    )
    c.frozen = ConfigDict(
        {"ref": defaults.frozen_role(args["sft"]), "reward": defaults.frozen_role(args["rm"])}
    )
    c.rollout = defaults.rollout_section()
    # 256 prompts per generate call: the KV cache of a call is 12.5 GiB per device (scripts/plan.py)
    c.rollout.update(batch_size=512, prompt_len=256, max_new_tokens=256, epochs=1, generate_rows=256)
    c.rollout.mesh = ConfigDict({"data": 2, "fsdp": 1, "tensor": 4})
    c.ptx = defaults.ptx_section(defaults.own_data("pretrain", args["ptx"], args["tokenizer"]), 8, 512)
    c.loss.ptx_coef = 27.8
    c.train.update(
        batch_size=64,  # the PPO minibatch
        micro_batches=8,
        seq_len=c.rollout.prompt_len + c.rollout.max_new_tokens,
        steps=2560,  # 320 rollouts of 512 prompts
        checkpoint_every=80,
        log_every=8,
    )
    del c.optim  # each role has its own
    c.lock()
    return c
