"""An 8B LLaMA-family model (Llama-3-8B shape: 32 layers, d 4096, GQA 32/8, d_ff 14336) on your data.

    python scripts/train.py --config configs/llama_8b.py:stage=pretrain,data=/data/*.jsonl,\
tokenizer=/ckpt/llama/tokenizer.json --workdir runs/llama_8b

Hardware: 8 GPUs (H100 80G) per replica; FSDP over all devices, bf16 compute, fp32 params and AdamW state
(8.0B params: 90 GiB of params + optimizer, 11 GiB per device), activation remat of everything but
batch-free matmuls, 256 sequences of 4,096 tokens (1M tokens) a step in 32 micro-batches of 8 sequences (one
per device). ``python scripts/plan.py --config configs/llama_8b.py --devices 8 --device_memory_gb 80``
plans 45 GiB peak per device (67 GiB with 16 micro-batches); check any change there before renting machines.
More nodes: the same command on each (README, "Run on several hosts"); FSDP spans them all.
Set ``--config.model.attention_impl=pallas`` (GPU, TPU) or ``cudnn`` (GPU) for fused attention.
"""

from __future__ import annotations

from gptjax.model import ModelConfig
from gptjax.train import defaults


def get_config(arg: str | None = None):
    args = defaults.parse_arg(arg, {"stage": "pretrain", "data": "", "tokenizer": ""})
    stage = args["stage"]
    if stage not in ("pretrain", "sft"):
        raise ValueError(f"configs/llama_8b.py: stage={stage!r}; choose 'pretrain' or 'sft'")
    c = defaults.base_config(stage)
    c.model = defaults.model_section(
        ModelConfig.llama(
            vocab_size=128256,  # the Llama 3 tokenizer; match your tokenizer.json
            d_model=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            d_ff=14336,
            max_len=8192,
            rope_theta=500000.0,
            tie_embeddings=False,
            dtype="bfloat16",
            param_dtype="float32",
            remat="dots_no_batch",
        )
    )
    c.data = defaults.own_data(stage, args["data"], args["tokenizer"])
    c.train.update(
        steps=50000 if stage == "pretrain" else 2000,
        batch_size=256,
        micro_batches=32,
        seq_len=4096,
        log_every=10,
        eval_every=1000,
        eval_steps=10,
        checkpoint_every=500,
    )
    c.optim.update(
        lr=3e-4 if stage == "pretrain" else 1e-5,
        warmup_steps=2000 if stage == "pretrain" else 50,
        weight_decay=0.1,
    )
    c.lock()
    return c
