"""Tiny GPT on the built-in synthetic task: every stage on a laptop CPU.

    python scripts/train.py --config configs/tiny.py:stage=pretrain --workdir runs/tiny/pretrain
    python scripts/train.py --config configs/tiny.py:stage=sft --workdir runs/tiny/sft \
        --config.train.init_from=runs/tiny/pretrain

Hardware: 2 CPU cores (about 1 s a step). Expected: a 3.3M-parameter model; pretrain loss falls from 5.6
(uniform over the byte vocabulary) to ~1.2 in 400 steps; 300 SFT steps reach a loss of ~0.5 and a greedy
gold reward of ~0.75 on held-out prompts (the noisy demonstrations themselves score ~0.82, the ideal 1.0).
"""

from __future__ import annotations

from gptjax import data, defaults
from gptjax.model import ModelConfig

STAGES = ("pretrain", "sft")


def get_config(arg: str | None = None):
    args = defaults.parse_arg(arg, {"stage": "pretrain"})
    stage = args["stage"]
    if stage not in STAGES:
        raise ValueError(f"configs/tiny.py: stage={stage!r}; choose one of {STAGES}")
    c = defaults.base_config(stage)
    c.model = defaults.model_section(
        ModelConfig.gpt2(vocab_size=288, d_model=256, n_layers=4, n_heads=4, max_len=128)
    )
    c.data = data.tiny_config(stage)
    c.train.batch_size = 16
    c.train.seq_len = 128
    c.train.eval_steps = 2
    if stage == "pretrain":
        c.train.steps = 400
        c.optim.lr = 2e-3
        c.optim.warmup_steps = 20
    else:
        c.train.steps = 300
        c.optim.lr = 5e-4
        c.optim.warmup_steps = 10
    c.train.checkpoint_every = c.train.steps
    c.lock()
    return c
