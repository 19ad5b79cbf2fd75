"""configs/tiny.py shrunk for the tests: the same data, losses and schedules with a 2-layer, 64-wide model on
batches of 8 x 64 tokens. ``tests/small_config.py:stage=sft`` works wherever ``configs/tiny.py:stage=sft``
does, for the single-model stages (pretrain, sft, rm, dpo)."""

import os

from gptjax.train import defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {
    "model.d_model": 64,
    "model.n_layers": 2,
    "model.n_heads": 4,
    "train.batch_size": 8,
    "train.seq_len": 64,
    "train.log_every": 5,
    "train.eval_steps": 1,
}


def get_config(arg=None):
    c = defaults.load_config(os.path.join(ROOT, "configs", "tiny.py") + ":" + (arg or ""))
    for key, value in SMALL.items():
        section, name = key.split(".")
        setattr(c[section], name, value)
    return c
