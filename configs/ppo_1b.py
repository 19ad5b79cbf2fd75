"""PPO on one GPU: an OPT-1.3B policy with an OPT-350M-shaped reward model and RM-initialised critic.

    python scripts/train.py --config configs/ppo_1b.py:sft=runs/sft_1b,rm=runs/rm_350m,\
prompts=/data/prompts/*.jsonl,tokenizer=/ckpt/opt/tokenizer.json --workdir runs/ppo_1b

DeepSpeed-Chat's single-GPU step 3 pair (actor OPT-1.3B, critic / reward OPT-350M shape), with InstructGPT's
PPO settings (docs/references.md) where one GPU allows them: 1 PPO epoch, clip 0.2, KL beta 0.02 per token,
gamma 1,
lambda 0.95, EMA 0.992 of the policy; rollouts of 128 prompts (256 prompt + 256 generated tokens: the KV cache
of 128 sequences is ~13 GB on top of ~40 GB of weights, Adam state and EMA), minibatches of 32. With
``ptx=/data/pretrain/*.jsonl`` it is PPO-ptx (coefficient 27.8, 8 pretraining sequences per RL sequence).
Learning rates are DeepSpeed-Chat's for this pair (policy 9.65e-6, critic 5e-6). Everything not named here
is ``configs/ppo_13b.py``'s, which this config starts from.

Throughput on synthetic prompts: ``python scripts/bench_ppo.py --config configs/ppo_1b.py`` (docs/gpu.md).
Expected: the RM reward rises while the KL to the reference grows to a few nats per response.
"""

from __future__ import annotations

import os

from ml_collections import ConfigDict

from gptjax.train import defaults


def get_config(arg: str | None = None):
    c = defaults.load_config(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "ppo_13b.py") + f":{arg or ''}"
    )
    ptx = bool(
        defaults.parse_arg(arg, {"sft": "", "rm": "", "prompts": "", "ptx": "", "tokenizer": ""})["ptx"]
    )
    with c.unlocked():
        c.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
        # OPT-1.3B; both roles on our fused kernels: training attention and the decode kernel (GPU, TPU)
        c.roles.policy.model.update(
            d_model=2048, n_layers=24, n_heads=32, attention_impl="pallas", remat="dots_no_batch"
        )
        c.roles.value.model.update(attention_impl="pallas")
        c.rollout.batch_size = 128
        c.rollout.generate_rows = 0  # all 128 in one call (KV cache 12 GiB)
        c.rollout.mesh = ConfigDict({})  # one device: the training layout
        c.ptx.ratio = 8 if ptx else 0
        c.loss.ptx_coef = 27.8 if ptx else 0.0
        c.train.update(
            batch_size=32,  # the PPO minibatch
            # 4 x 8 rows: a whole 32-row minibatch's saved activations alone are ~26 GB; PPO-ptx adds 8 x 32
            # pretraining sequences to each minibatch
            micro_batches=32 if ptx else 4,
            steps=1600,  # 400 rollouts of 128 prompts
            checkpoint_every=100,
            log_every=4,
        )
    return c
