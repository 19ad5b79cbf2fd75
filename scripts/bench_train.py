"""Train-step throughput of a config on synthetic batches: step time, tokens/s and MFU.

    python scripts/bench_train.py --config configs/llama_1b.py --config.train.batch_size=4 \
        --config.train.seq_len=4096 --config.model.attention_impl=cudnn --steps 10

Builds the config's model, optimizer and the one jitted train step exactly as ``scripts/train.py`` does (same
mesh, shardings, micro-batches and remat), feeds it random batches of the stage's shape and times ``--steps``
steps after ``--warmup``. tokens/s and MFU count only real (non-padding) tokens: pretraining batches are
packed full; SFT batches are padded to ``--fill`` of each row on average, like real demonstrations. FLOPs per
token are ``gptjax.model.flops_per_token`` (6N + causal attention), the peak is
``gptjax.model.flops.PEAK_FLOPS``.
"""

from __future__ import annotations

import collections
import glob
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import FrozenConfigDict, config_flags

from gptjax import model, train
from gptjax.losses import lm
from gptjax.model import flops, sharding
from gptjax.train import optim, roles
from gptjax.train import state as state_lib
from gptjax.train import step as step_lib

config_flags.DEFINE_config_file("config", None, "Python config file (with :arg).", lock_config=True)
flags.DEFINE_integer("steps", 10, "timed steps")
flags.DEFINE_integer("warmup", 2, "untimed steps first (compilation, autotuning)")
flags.DEFINE_float("fill", 0.75, "SFT: mean fraction of each row holding real tokens")
flags.DEFINE_integer("profile", 0, "then trace this many steps and print where the device time goes")
flags.mark_flags_as_required(["config"])


def synthetic_batch(stage: str, batch: int, seq_len: int, vocab: int, fill: float, seed: int = 0) -> dict:
    """A random batch with the data layer's keys: packed documents (pretrain) or padded demos (sft)."""
    rng = np.random.default_rng(seed)
    tokens_BL = rng.integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
    if stage == "pretrain":  # packed full: documents of mean length seq_len / 4 back to back
        cuts = [np.sort(rng.choice(np.arange(1, seq_len), 3, replace=False)) for _ in range(batch)]
        lengths = [np.diff(c, prepend=0, append=seq_len) for c in cuts]
        real_B = np.full(batch, seq_len)
        prompt_B = np.zeros(batch, np.int64)
    elif stage == "sft":
        lengths = None
        real_B = np.clip(rng.normal(fill, 0.15, batch) * seq_len, 8, seq_len).astype(np.int64)
        prompt_B = (real_B * rng.uniform(0.2, 0.6, batch)).astype(np.int64)
    else:
        raise ValueError(f"bench_train: stage={stage!r}; LM stages 'pretrain' and 'sft' are benchmarked here")
    seg_BL = np.zeros((batch, seq_len), np.int32)
    pos_BL = np.zeros((batch, seq_len), np.int32)
    w_BL = np.zeros((batch, seq_len), np.float32)
    for b in range(batch):
        docs = lengths[b] if lengths is not None else [real_B[b]]
        start = 0
        for d, n in enumerate(docs):
            seg_BL[b, start : start + n] = d + 1
            pos_BL[b, start : start + n] = np.arange(n)
            w_BL[b, start + prompt_B[b] : start + n - 1] = 1.0  # no loss on prompts nor across documents
            start += n
    return {
        "inputs_BL": tokens_BL[:, :-1],
        "targets_BL": tokens_BL[:, 1:],
        "weights_BL": w_BL,
        "segment_ids_BL": seg_BL,
        "positions_BL": pos_BL,
    }


# Kernel-name fragments -> category, first match wins (cuBLAS / cuDNN / our Pallas kernels / XLA fusions).
CATEGORIES = (
    ("attention", ("flash_attention", "fmha", "cudnn", "decode_attention")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "ynn_fusion", "dot")),
    ("collective", ("nccl", "all-reduce", "all-gather", "reduce-scatter")),
    ("copy / transpose", ("copy", "transpose", "memcpy", "memset", "dynamic-update-slice")),
)


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), "other fusions")


def profile_events(run, steps: int) -> dict[str, list[float]]:
    """Trace ``run()`` and return kernel name -> durations in ms: the GPU planes' stream lines when there is a
    GPU, else the CPU client threads' XLA events (thread-pool bookkeeping dropped)."""
    with tempfile.TemporaryDirectory(prefix="gptjax_profile_") as logdir:
        with jax.profiler.trace(logdir):
            run()
        [path] = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        data = jax.profiler.ProfileData.from_file(path)
    planes = [p for p in data.planes if p.name.startswith("/device:GPU")]
    if planes:  # stream lines hold the kernels; "XLA Ops" / "XLA Modules" lines would count them again
        lines = [ln for p in planes for ln in p.lines if not ln.name.startswith(("XLA", "Steps", "Source"))]
    else:  # CPU: XLA ops on the client and Eigen threads (their executor wrappers would count them twice)
        lines = [
            ln
            for p in data.planes
            if p.name == "/host:CPU"
            for ln in p.lines
            if ln.name not in ("python", "")
        ]
    skip = ("ThreadpoolListener", "SlinkyThreadPool", "ThunkExecutor", "end: ", "$")  # "$": Python frames
    events = collections.defaultdict(list)
    for ln in lines:
        for ev in ln.events:
            if not ev.name.startswith(skip):
                events[ev.name].append(ev.duration_ns / 1e6 / steps)
    return events


def print_profile(events: dict[str, list[float]], step_ms: float, steps: int, top: int = 25) -> None:
    """Device time per step by category and the top kernels (calls counted over the ``steps`` traced)."""
    totals = {name: sum(d) for name, d in events.items()}
    busy = sum(totals.values())
    by_cat = collections.Counter()
    for name, ms in totals.items():
        by_cat[category(name)] += ms
    print(f"\nprofile: device busy {busy:.1f} ms of a {step_ms:.1f} ms step (the rest: idle / host gaps)")
    print(f"{'category':24} {'ms/step':>9} {'share':>7}")
    for cat, ms in by_cat.most_common():
        print(f"{cat:24} {ms:9.2f} {ms / busy:7.1%}")
    calls_head = f"calls/{steps}"
    print(f"\n{'kernel (top ' + str(top) + ')':72} {calls_head:>8} {'ms/step':>9} {'share':>7}")
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        calls = len(events[name])
        print(f"{name[:72]:72} {calls:8d} {ms:9.2f} {ms / busy:7.1%}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config, FLAGS = flags.FLAGS.config, flags.FLAGS
    t = config.train
    mesh = sharding.make_mesh(config.mesh)
    cfg = roles.model_config(config.model)
    train.check_config(config, cfg, mesh)
    with jax.set_mesh(mesh):
        params = model.init(cfg, jax.random.key(0), mesh)
        optimizer = optim.make_optimizer(config.optim, t.steps)
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
        state = state_lib.create(
            params, optimizer, ema=config.optim.ema_decay > 0, param_shardings=param_shardings, mesh=mesh
        )
        del params
        batch = synthetic_batch(config.stage, t.batch_size, t.seq_len, cfg.vocab_size, FLAGS.fill)
        ctx = step_lib.Ctx(model_cfg=cfg, loss_cfg=FrozenConfigDict(config.loss))
        step = step_lib.make_train_step(
            lm.loss_fn,
            optimizer,
            micro_batches=t.micro_batches,
            ema_decay=config.optim.ema_decay,
            mesh=mesh,
            state_shardings=state_lib.state_shardings(state, param_shardings, mesh),
            batch_shardings=sharding.batch_shardings(batch, mesh),
            ctx_shardings=jax.tree.map(lambda x: x.sharding, ctx),
        )
        batch = sharding.shard_batch(batch, mesh)
        rng = jax.random.key(1)
        t0 = time.perf_counter()
        for _ in range(FLAGS.warmup):
            state, metrics = step(state, batch, rng, ctx)
        loss = float(jax.device_get(metrics["loss"])) if FLAGS.warmup else float("nan")
        warm_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
            state, metrics = step(state, batch, rng, ctx)
        jax.block_until_ready(metrics)
        step_s = (time.perf_counter() - t0) / FLAGS.steps
        events = None
        if FLAGS.profile:

            def run():
                s = state
                for _ in range(FLAGS.profile):
                    s, m = step(s, batch, rng, ctx)
                jax.block_until_ready(m)

            events = profile_events(run, FLAGS.profile)
    real = int(np.sum(np.asarray(batch["segment_ids_BL"]) > 0))
    total = t.batch_size * t.seq_len
    tps = real / step_s
    peak = flops.peak_flops()
    fpt = model.flops_per_token(cfg, t.seq_len)
    util = flops.mfu(fpt, tps, peak, jax.device_count())
    n_params = model.num_params(cfg)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}")
    print(
        f"model: {n_params / 1e9:.3f}B params, {cfg.n_layers} layers, d {cfg.d_model}, "
        f"attention {cfg.attention_impl}, remat {cfg.remat}, dtype {cfg.dtype}/{cfg.param_dtype}"
    )
    hdr = f"{'stage':8} {'batch':>6} {'seq':>6} {'real tok':>9} {'step ms':>9} {'tokens/s':>10} "
    hdr += f"{'TFLOP/s/dev':>12} "
    hdr += f"{'MFU':>6} {'warmup s':>9} {'loss':>7}"
    print(hdr)
    print("-" * len(hdr))
    tflops = fpt * tps / jax.device_count() / 1e12
    mfu_s = f"{util:6.1%}" if util is not None else f"{'-':>6}"
    print(
        f"{config.stage:8} {t.batch_size:6d} {t.seq_len:6d} {real / total:9.0%} {step_s * 1e3:9.1f} "
        f"{tps:10.0f} "
        f"{tflops:12.1f} {mfu_s} {warm_s:9.1f} {loss:7.3f}"
    )
    if events is not None:
        print_profile(events, step_s * 1e3, FLAGS.profile)


if __name__ == "__main__":
    app.run(main)
