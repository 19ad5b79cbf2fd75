"""GPT-2 small (124M) pretraining or SFT on your own data.

    python scripts/train.py --config configs/gpt2_124m.py:stage=pretrain,data=/data/corpus/*.txt,\
tokenizer=/ckpt/gpt2/tokenizer.json --workdir runs/gpt2_124m

Data: ``data=`` is a glob of text files or JSONL (``{"text": ...}`` for pretrain, ``{"prompt", "response"}``
or ``{"messages"}`` for sft); ``tokenizer=`` a Hugging Face tokenizer.json (bytes when omitted).
Hardware: one or more GPUs/TPU chips; params are FSDP-sharded over every device, bf16 compute with fp32
params and optimizer state; 16 micro-batches of 32 sequences (``scripts/plan.py --config
configs/gpt2_124m.py --devices 1``: 44 GiB peak on one device). Set ``--config.model.attention_impl=pallas``
(GPU, TPU) or ``cudnn`` (GPU).
Expected: on OpenWebText-like data, validation loss ~3.3 after ~5B tokens (the GPT-2 small recipe: lr 6e-4,
batch 0.5M tokens, 1,024 context).
"""

from __future__ import annotations

from gptjax.model import ModelConfig
from gptjax.train import defaults


def get_config(arg: str | None = None):
    args = defaults.parse_arg(arg, {"stage": "pretrain", "data": "", "tokenizer": ""})
    stage = args["stage"]
    if stage not in ("pretrain", "sft"):
        raise ValueError(f"configs/gpt2_124m.py: stage={stage!r}; choose 'pretrain' or 'sft'")
    c = defaults.base_config(stage)
    c.model = defaults.model_section(
        ModelConfig.gpt2(
            vocab_size=50304,  # 50257 rounded up to a multiple of 64 for the matmuls
            d_model=768,
            n_layers=12,
            n_heads=12,
            max_len=1024,
            dtype="bfloat16",
            param_dtype="float32",
        )
    )
    c.data = defaults.own_data(stage, args["data"], args["tokenizer"])
    c.train.update(
        steps=10000 if stage == "pretrain" else 2000,
        batch_size=512,
        micro_batches=16,
        seq_len=1024,
        log_every=20,
        eval_every=500,
        eval_steps=20,
        checkpoint_every=1000,
    )
    c.optim.update(
        lr=6e-4 if stage == "pretrain" else 3e-5,
        warmup_steps=700 if stage == "pretrain" else 100,
        weight_decay=0.1,
    )
    c.lock()
    return c
