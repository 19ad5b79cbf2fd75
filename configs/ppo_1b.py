"""PPO on one GPU: an OPT-1.3B policy with an OPT-350M-shaped reward model and RM-initialised critic.

    python scripts/train.py --config configs/ppo_1b.py:sft=runs/sft_1b,rm=runs/rm_350m,\
prompts=/data/prompts/*.jsonl,tokenizer=/ckpt/opt/tokenizer.json --workdir runs/ppo_1b

DeepSpeed-Chat's single-GPU step 3 pair (actor OPT-1.3B, critic / reward OPT-350M shape), with InstructGPT's
PPO settings (DESIGN.md §5) where one GPU allows them: 1 PPO epoch, clip 0.2, KL beta 0.02 per token, gamma 1,
lambda 0.95, EMA 0.992 of the policy; rollouts of 128 prompts (256 prompt + 256 generated tokens: the KV cache
of 128 sequences is ~13 GB on top of ~40 GB of weights, Adam state and EMA), minibatches of 32. With
``ptx=/data/pretrain/*.jsonl`` it is PPO-ptx (coefficient 27.8, 8 pretraining sequences per RL sequence).
Learning rates are DeepSpeed-Chat's for this pair (policy 9.65e-6, critic 5e-6).

Throughput on synthetic prompts: ``python scripts/bench_ppo.py --config configs/ppo_1b.py`` (docs/gpu.md).
Expected: the RM reward rises while the KL to the reference grows to a few nats per response.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from gptjax import defaults
from gptjax.model import ModelConfig


def opt(d_model: int, n_layers: int, n_heads: int, head: str) -> ModelConfig:
    return ModelConfig.opt(
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        head=head,
        dtype="bfloat16",
        param_dtype="float32",
        remat="dots_no_batch",
        attention_impl="pallas",  # our fused kernels: training attention and the decode kernel (GPU, TPU)
    )


def get_config(arg: str | None = None):
    args = defaults.parse_arg(arg, {"sft": "", "rm": "", "prompts": "", "ptx": "", "tokenizer": ""})
    c = defaults.base_config("ppo")
    c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    c.data = defaults.own_data("prompts", args["prompts"], args["tokenizer"])

    def optim(lr: float, ema: float = 0.0) -> ConfigDict:
        o = c.optim.copy_and_resolve_references()
        o.update(lr=lr, warmup_steps=10, schedule="constant", ema_decay=ema)
        return o

    c.roles = ConfigDict(
        {
            "policy": defaults.trained_role(opt(2048, 24, 32, "lm"), optim(9.65e-6, ema=0.992), args["sft"]),
            "value": defaults.trained_role(opt(1024, 24, 16, "scalar"), optim(5e-6), args["rm"]),
        }
    )
    c.frozen = ConfigDict(
        {"ref": defaults.frozen_role(args["sft"]), "reward": defaults.frozen_role(args["rm"])}
    )
    c.rollout = defaults.rollout_section()
    c.rollout.update(batch_size=128, prompt_len=256, max_new_tokens=256, epochs=1)
    ptx = bool(args["ptx"])
    ptx_data = defaults.own_data("pretrain", args["ptx"], args["tokenizer"])
    c.ptx = defaults.ptx_section(ptx_data, 8 if ptx else 0, c.rollout.prompt_len + c.rollout.max_new_tokens)
    c.loss.ptx_coef = 27.8 if ptx else 0.0
    c.train.update(
        batch_size=32,  # the PPO minibatch
        # 4 x 8 rows: a whole 32-row minibatch's saved activations alone are ~26 GB; PPO-ptx adds 8 x 32
        # pretraining sequences to each minibatch
        micro_batches=32 if ptx else 4,
        seq_len=c.rollout.prompt_len + c.rollout.max_new_tokens,
        steps=1600,  # 400 rollouts of 128 prompts
        checkpoint_every=100,
        log_every=4,
    )
    del c.optim  # each role has its own
    c.lock()
    return c
