"""What several test files share: the small tiny-task config, reading a run's logged rows, random params drawn
on the host, and one way to write a fake workdir (a checkpoint as ``train.run`` leaves it, without training).

Test files import from here, never from each other."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax import checkpoint, model
from gptjax.train import defaults
from gptjax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_CONFIG = os.path.join(ROOT, "tests", "small_config.py")  # configs/tiny.py with a smaller model
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.py")
PRETRAIN_STEPS, SFT_STEPS = 40, 40  # the shared runs in conftest.py
# A small llama (GQA) for checkpoint round trips
CHECKPOINT_CFG = model.ModelConfig.llama(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=16
)


def script_env():
    """This process's environment for a script that sets its own device count: XLA_FLAGS without the tests'
    8 simulated devices (their other compiler settings kept), the repository on PYTHONPATH."""
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


# The smallest model and batches the end-to-end reliability tests train (tiny_config overrides).
TINY = {
    "model.d_model": 32,
    "model.n_heads": 2,
    "model.n_layers": 1,
    "train.seq_len": 32,
    "train.log_every": 1,
}


def tiny_config(stage, **overrides):
    """``tests/small_config.py:stage=STAGE`` with ``section.key=value`` overrides."""
    c = defaults.load_config(f"{SMALL_CONFIG}:stage={stage}")
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(c[section], name, value)
    return c


def logged(workdir, split="train"):
    """The rows of one split in a run's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def random_params(cfg, seed, mesh=None, std=0.1):
    """Random weights (norm scales 1) drawn on the host: model.init's compile costs seconds on CPU."""
    r = np.random.default_rng(seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: (
            np.ones(s.shape, s.dtype)
            if "scale" in jax.tree_util.keystr(path)
            else r.normal(0.0, std, s.shape).astype(s.dtype)
        ),
        model.param_shapes(cfg),
    )
    return jax.device_put(params, model.param_shardings(cfg, mesh) if mesh is not None else None)


def save_workdir(path, stage, params, cfg=None, *, roles=None, ema_params=None, step=0, config=None):
    """A workdir as ``train.run`` leaves it, written directly: one checkpoint at ``step`` of ``params`` (keyed
    by role when ``roles`` names several or one not called 'model'), the EMA weights if given, and the meta
    (``config``: the run config as JSON, where a reader looks up the run's settings). Returns ``path``."""
    roles = roles or {"model": cfg}
    extra = {} if config is None else {"config": config}
    meta = checkpoint.meta_for(next(iter(roles.values())), stage, roles=roles, **extra)
    st = state_lib.TrainState(step=jnp.int32(step), params=params, opt_state={}, ema_params=ema_params)
    mngr = checkpoint.manager(str(path))
    checkpoint.save(mngr, st, data_state={}, meta=meta)
    mngr.wait_until_finished()
    return str(path)


def save_random_base(path, cfgs, seed=0):
    """``path/sft`` and ``path/rm``: random (untrained) SFT and reward-model workdirs of ``cfgs['sft']`` and
    ``cfgs['rm']``, what an RL stage or a sweep starts from when only the plumbing is under test."""
    for i, stage in enumerate(("sft", "rm")):
        save_workdir(os.path.join(path, stage), stage, random_params(cfgs[stage], seed + i), cfgs[stage])


def toy_state(k: int) -> state_lib.TrainState:
    """A train state whose every number depends on k (a model would only add compile time here)."""
    params = {"w_DD": np.full((256, 256), k, np.float32), "b_D": np.arange(256, dtype=np.float32) + k}
    opt_state = jax.tree.map(lambda x: x + k, optax.adam(1e-3).init(params))
    return state_lib.TrainState(step=jnp.int32(k), params=params, opt_state=opt_state)


def rl_model_cfg(head="lm", **kw):
    """The RL tests' 2-layer, 32-wide model (a normal-initialised scalar head, so a reward model scores)."""
    return model.ModelConfig.gpt2(
        vocab_size=288,
        d_model=32,
        n_layers=2,
        n_heads=4,
        max_len=64,
        head=head,
        scalar_head_init="normal",
        **kw,
    )


def rank_batch(valid_counts, K=4, L=16, seed=0, vocab=250):
    """'rm' batch: prompt b has valid_counts[b] responses (the first ones), random lengths and token ids in
    [1, vocab), pad id 0."""
    r = np.random.default_rng(seed)
    B = len(valid_counts)
    tokens = np.zeros((B, K, L), np.int32)
    lengths = np.zeros((B, K), np.int32)
    prompt_lengths = np.zeros((B, K), np.int32)
    valid = np.zeros((B, K), bool)
    for b, n in enumerate(valid_counts):
        p = int(r.integers(2, 6))
        prompt = r.integers(1, vocab, p)
        for k in range(n):
            t = int(r.integers(p + 1, L + 1))
            tokens[b, k, :p] = prompt
            tokens[b, k, p:t] = r.integers(1, vocab, t - p)
            lengths[b, k], prompt_lengths[b, k], valid[b, k] = t, p, True
    return {
        "tokens_BKL": tokens,
        "prompt_lengths_BK": prompt_lengths,
        "lengths_BK": lengths,
        "valid_BK": valid,
    }


def killed_after(workdir, dst, step):
    """A copy of ``workdir`` as a run killed right after step ``step``'s checkpoint leaves it: the later
    checkpoints removed. Returns the copy's path."""
    shutil.copytree(workdir, dst)
    ckpts = os.path.join(dst, "checkpoints")
    for name in os.listdir(ckpts):
        if name.isdigit() and int(name) > step:
            shutil.rmtree(os.path.join(ckpts, name))
    return str(dst)


def assert_same_models(a, b, roles_ema, what):
    """Every (role, ema) of ``roles_ema`` loads bitwise the same params from workdirs ``a`` and ``b``."""
    for role, ema in roles_ema:
        _, pa = checkpoint.load_model(a, role=role, ema=ema)
        _, pb = checkpoint.load_model(b, role=role, ema=ema)
        for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
            np.testing.assert_array_equal(x, y, err_msg=f"{role} (EMA {ema}), {what}")
