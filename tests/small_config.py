"""configs/tiny.py shrunk for the tests: the same data, losses and schedules with a 2-layer, 64-wide model on
batches of 8 x 64 tokens. ``tests/small_config.py:stage=sft`` works wherever ``configs/tiny.py:stage=sft``
does. The RL stages (ppo, grpo, ...) keep tiny.py's rollout and batch sizes with every role's model shrunk;
``get_sweeps()`` is tiny.py's, so ``scripts/sweep.py --config tests/small_config.py`` runs its sweeps on the
small model."""

import importlib.util
import os

from gptjax.train import defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
MODEL = {"d_model": 64, "n_layers": 2, "n_heads": 4}
SMALL = {
    "train.batch_size": 8,
    "train.seq_len": 64,
    "train.log_every": 5,
    "train.eval_steps": 1,
}


def get_config(arg=None):
    c = defaults.load_config(TINY + ":" + (arg or ""))
    if "roles" in c:  # an RL stage: each trained role's model; the frozen ones are read from checkpoints
        for role in c.roles.values():
            role.model.update(**MODEL)
        return c
    c.model.update(**MODEL)
    for key, value in SMALL.items():
        section, name = key.split(".")
        setattr(c[section], name, value)
    return c


def get_sweeps():
    spec = importlib.util.spec_from_file_location("tiny_config", TINY)
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    return tiny.get_sweeps()
