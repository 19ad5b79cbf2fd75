"""An OPT-350M-class reward model (24 layers, d 1024, 16 heads; ~330M params) on your ranked comparisons.

    python scripts/train.py --config configs/rm_350m.py:init_from=runs/sft_opt,data=/data/rank/*.jsonl,\
sft_data=/data/sft/*.jsonl,tokenizer=/ckpt/opt/tokenizer.json,rankings=33000 --workdir runs/rm_350m

``init_from`` is an SFT workdir or a Hugging Face OPT directory of this shape (the LM head is dropped, the
scalar head starts at zero). facebook/opt-350m itself projects its 512-wide embeddings to 1024 and is refused
by the importer with that reason; OPT checkpoints without the projection (125M, 1.3B, ...) load directly.
``data`` holds rankings (``{"prompt", "responses": [best, ..., worst]}``, or ``chosen`` / ``rejected``),
``sft_data`` the demonstrations whose mean reward is folded into the head's bias after training (InstructGPT's
normalisation), ``rankings`` the number of ranked prompts: InstructGPT trains one epoch, the batch counted in
prompts (each with all its C(K, 2) comparisons), so ``train.steps = ceil(rankings / batch_size)``.
Hardware: one 80 GB GPU (bf16 compute, fp32 params and Adam state ~5 GB, remat); more GPUs shard it (FSDP).
Expected: held-out pairwise accuracy ~0.65-0.72 on human preference data such as Anthropic HH (the range
InstructGPT and DeepSpeed-Chat report for RMs of this size).
"""

from __future__ import annotations

import math

from gptjax.model import ModelConfig
from gptjax.train import defaults


def get_config(arg: str | None = None):
    args = defaults.parse_arg(
        arg, {"init_from": "", "data": "", "sft_data": "", "tokenizer": "", "rankings": "32000"}
    )
    c = defaults.base_config("rm")
    c.model = defaults.model_section(
        ModelConfig(
            family="opt",
            vocab_size=50272,
            d_model=1024,
            n_layers=24,
            n_heads=16,
            d_ff=4096,
            max_len=2048,
            norm="layernorm",
            mlp="relu",
            pos="learned",
            tie_embeddings=True,
            head="scalar",
            dtype="bfloat16",
            param_dtype="float32",
            remat="dots_no_batch",
        )
    )
    c.data = defaults.own_data("rm", args["data"], args["tokenizer"])
    batch = 64  # prompts per step (InstructGPT's RM batch); K responses each
    c.train.update(
        init_from=args["init_from"],
        steps=max(1, math.ceil(int(args["rankings"]) / batch)),
        batch_size=batch,
        micro_batches=4,
        seq_len=512,
        eval_every=200,
        eval_steps=20,
        checkpoint_every=200,
        log_every=10,
    )
    # InstructGPT RM: Adam (0.9, 0.95), cosine to 10%, a small learning rate for a pretrained model
    c.optim.update(lr=9e-6, warmup_steps=50, weight_decay=0.0)
    from ml_collections import ConfigDict

    c.normalize = ConfigDict(
        {"data": defaults.own_data("sft", args["sft_data"], args["tokenizer"]), "examples": 2048}
    )
    c.lock()
    return c
