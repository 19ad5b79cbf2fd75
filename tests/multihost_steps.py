"""Five pretraining steps on 8 CPU devices, as one process or as one of several (tests/test_multihost.py).

    python tests/multihost_steps.py OUT.json NUM_PROCESSES [PROCESS_ID COORDINATOR_PORT]

Each of N processes has 8 / N simulated devices, initialises ``jax.distributed`` through
``gptjax.model.sharding.maybe_initialize_distributed`` and reads only its own shard of the data (shard
PROCESS_ID of N); one process (N = 1 here) reads the same N shards itself and puts their rows side by
side, so both runs train on the same global batches. Process 0 writes the per-step losses and gradient
norms to OUT.json.
"""

import json
import os
import sys

out_path, nproc = sys.argv[1], int(sys.argv[2])
pid, port = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else (0, 0)
SHARDS = 2  # the data is always split in two shards: the reference run reads both
flags = os.environ.get("XLA_FLAGS", "")  # the tests' compiler settings, without a device count
os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={8 // nproc}".strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from gptjax import data, model  # noqa: E402
from gptjax.losses import lm  # noqa: E402
from gptjax.model import sharding  # noqa: E402
from gptjax.train import state as state_lib  # noqa: E402
from gptjax.train import step  # noqa: E402

if nproc > 1:
    sharding.maybe_initialize_distributed(f"localhost:{port}", nproc, pid)
assert jax.process_count() == nproc and jax.device_count() == 8, (jax.process_count(), jax.device_count())

GLOBAL_BATCH, SEQ = 16, 64
cfg = model.ModelConfig.gpt2(vocab_size=288, d_model=64, n_layers=2, n_heads=4, max_len=SEQ)
mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
shards = [pid] if nproc > 1 else list(range(SHARDS))
iters = [
    data.make_iterator(
        data.tiny_config("pretrain"),
        stage="pretrain",
        batch_size=GLOBAL_BATCH // SHARDS,
        seq_len=SEQ,
        seed=0,
        shard_index=i,
        num_shards=SHARDS,
    )
    for i in shards
]
params = model.init(cfg, jax.random.key(0), mesh)
optimizer = optax.adamw(1e-3)
shardings = jax.tree.map(lambda x: x.sharding, params)
train_state = state_lib.create(params, optimizer, ema=False, param_shardings=shardings, mesh=mesh)
train_step = step.make_train_step(lm.loss_fn, optimizer)
ctx = step.Ctx(model_cfg=cfg)
rows = []
with jax.set_mesh(mesh):
    for _ in range(5):
        local = [next(it) for it in iters]
        batch = {k: np.concatenate([b[k] for b in local]) for k in local[0]}  # this host's rows
        train_state, metrics = train_step(
            train_state, sharding.shard_batch(batch, mesh), jax.random.key(1), ctx
        )
        rows.append({k: float(metrics[k]) for k in ("loss", "grad_norm")})
if jax.process_index() == 0:
    with open(out_path, "w") as f:
        json.dump(rows, f)
