"""A LLaMA-family ~1.2B model (Llama-3.2-1B shape: 16 layers, d 2048, GQA 32/8) on your own data.

    python scripts/train.py --config configs/llama_1b.py:stage=pretrain,data=/data/*.jsonl,\
tokenizer=/ckpt/llama/tokenizer.json --workdir runs/llama_1b

Hardware: 8 GPUs (H100 80G) or a TPU v4-8/v5e-8 and up; FSDP over all devices, bf16 compute, fp32 params and
AdamW state (~20 GB of params + optimizer, sharded), activation remat of everything but batch-free matmuls,
8 micro-batches of 32 sequences (``scripts/plan.py --config configs/llama_1b.py --devices 8``: 30 GiB
peak per device).
Set ``--config.model.attention_impl=pallas`` (GPU, TPU) or ``cudnn`` (GPU) for fused attention.
Expected: tokens/s and MFU are logged every 10 steps; on 8x H100 aim for MFU >= 40%.
"""

from __future__ import annotations

from gptjax.model import ModelConfig
from gptjax.train import defaults


def get_config(arg: str | None = None):
    args = defaults.parse_arg(arg, {"stage": "pretrain", "data": "", "tokenizer": ""})
    stage = args["stage"]
    if stage not in ("pretrain", "sft"):
        raise ValueError(f"configs/llama_1b.py: stage={stage!r}; choose 'pretrain' or 'sft'")
    c = defaults.base_config(stage)
    c.model = defaults.model_section(
        ModelConfig.llama(
            vocab_size=128256,  # the Llama 3 tokenizer; match your tokenizer.json
            d_model=2048,
            n_layers=16,
            n_heads=32,
            n_kv_heads=8,
            d_ff=8192,
            max_len=4096,
            rope_theta=500000.0,
            tie_embeddings=True,
            dtype="bfloat16",
            param_dtype="float32",
            remat="dots_no_batch",
        )
    )
    c.data = defaults.own_data(stage, args["data"], args["tokenizer"])
    c.train.update(
        steps=20000 if stage == "pretrain" else 2000,
        batch_size=256,
        micro_batches=8,
        seq_len=4096,
        log_every=10,
        eval_every=1000,
        eval_steps=10,
        checkpoint_every=1000,
    )
    c.optim.update(
        lr=3e-4 if stage == "pretrain" else 2e-5,
        warmup_steps=2000 if stage == "pretrain" else 50,
        weight_decay=0.1,
    )
    c.lock()
    return c
