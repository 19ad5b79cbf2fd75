"""PPO throughput of a config: generation + scoring + training per rollout, tokens/s end to end.

    python scripts/bench_ppo.py --config configs/ppo_1b.py --rollouts 4
    python scripts/bench_ppo.py --config configs/tiny.py:stage=ppo --rollouts 3      # CPU smoke run

Runs the PPO stage's own pieces (``RolloutSource``: generate with the KV cache, ``rl.experience``, then
``rollout.epochs`` passes of minibatches through the one jitted train step, the EMA update included) on fresh
weights for all four roles; the checkpoints in ``init_from`` are not read. Prompts are random ids of the tiny
task's vocabulary, ``rollout.prompt_len`` long (PPO-ptx text: random documents), made in numpy, so no
input pipeline runs; a fresh policy almost never samples EOS from its full vocabulary, so responses run to
``max_new_tokens``: the work of real full-length prompts.

tokens/s counts ``rollout.batch_size x (prompt_len + max_new_tokens)`` per rollout, DeepSpeed-Chat's step-3
count (padded prompt + answer length); generated tokens/s counts the sampled tokens alone. The first
``--warmup`` rollouts (compilation) are not timed.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from gptjax import data, model
from gptjax.model import sharding
from gptjax.train import build

config_flags.DEFINE_config_file("config", None, "Python config file (with :arg) of a PPO stage.")
flags.DEFINE_integer("rollouts", 4, "rollouts in all, --warmup of them untimed")
flags.DEFINE_integer("warmup", 1, "untimed rollouts first (compilation)")
flags.mark_flags_as_required(["config"])


class SyntheticPrompts:
    """Prompt batches of random ids, full length: the data protocol (next, get_state, set_state)."""

    def __init__(self, vocab, batch_size: int, prompt_len: int, seed: int = 0):
        self.vocab, self.shape, self.seed, self.count = vocab, (batch_size, prompt_len), seed, 0

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.count])
        self.count += 1
        B, P = self.shape
        top = min(self.vocab.pad_id, self.vocab.eos_id, self.vocab.bos_id)  # ordinary ids lie below these
        prompt_BP = rng.integers(0, top, (B, P), dtype=np.int32)
        prompt_BP[:, 0] = self.vocab.bos_id
        return {
            "prompt_BP": prompt_BP,
            "prompt_lengths_B": np.full(B, P, np.int32),
            "prompt_ids_B": np.arange(B, dtype=np.int32) + B * self.count,
        }

    def get_state(self) -> dict:
        return {"count": self.count}

    def set_state(self, state: dict) -> None:
        self.count = state["count"]


class SyntheticText(SyntheticPrompts):
    """PPO-ptx pretraining batches: one random document per row, the 'pretrain' batch keys."""

    def __next__(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.count, 1])
        self.count += 1
        B, L = self.shape
        tokens_BL = rng.integers(0, self.vocab.vocab_size, (B, L + 1), dtype=np.int32)
        return {
            "inputs_BL": tokens_BL[:, :-1],
            "targets_BL": tokens_BL[:, 1:],
            "weights_BL": np.ones((B, L), np.float32),
            "segment_ids_BL": np.ones((B, L), np.int32),
            "positions_BL": np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy(),
        }


def bench_config(config):
    """The config with the tiny task's vocabulary (the synthetic prompts' ids) and PPO's reward position."""
    c = config.copy_and_resolve_references()
    c.unlock()
    c.data = data.tiny_config("prompts")
    c.rollout.gold = ""  # a gold reward of random prompts means nothing
    if not c.rollout.reward_at:
        c.rollout.reward_at = "last"  # no reward-model checkpoint to read it from
    return c


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    c = bench_config(FLAGS.config)
    if c.stage != "ppo":
        raise app.UsageError(f"bench_ppo: the config's stage is {c.stage!r}; give a PPO config")
    if FLAGS.rollouts <= FLAGS.warmup:
        raise app.UsageError(f"--rollouts={FLAGS.rollouts} must exceed --warmup={FLAGS.warmup}")
    t, r = c.train, c.rollout
    per_rollout = r.epochs * r.batch_size // t.batch_size
    t.steps = FLAGS.rollouts * per_rollout
    mesh = sharding.make_mesh(c.mesh)
    vocab = data.get_vocabulary(c.data)
    with jax.set_mesh(mesh):
        k_build, k_train = jax.random.split(jax.random.key(t.seed))
        # The run PPO would build, with every role (reference and reward model too) freshly initialised.
        run = build.build(
            c,
            mesh,
            fresh=True,
            rng=k_build,
            prompts=SyntheticPrompts(vocab, r.batch_size, r.prompt_len, t.seed),
            ptx=SyntheticText(vocab, int(c.ptx.ratio * t.batch_size), c.ptx.seq_len, t.seed),
        )
        state, ctx, source = run.state, run.ctx, run.source
        cfgs = run.cfgs
        starts, rows, step = [], [], None
        for i in range(t.steps):
            if i % per_rollout == 0:  # a new rollout: the policy must be up to date, as in the real loop
                jax.block_until_ready(state.params)
                starts.append(time.perf_counter())
            batch = source.next(state)
            if i % per_rollout == 0:
                rows.append(source.pop_metrics())
            if step is None:
                step = run.make_step(batch)
            state, metrics = step(state, sharding.shard_batch(batch, mesh), k_train, ctx)
        jax.block_until_ready((state, metrics))
        starts.append(time.perf_counter())
    report(c, cfgs, starts, rows, FLAGS.warmup, float(jax.device_get(metrics["loss"])))


def report(c, cfgs, starts, rows, warmup, loss) -> None:
    r = c.rollout
    cycle = np.diff(starts)[warmup:]
    gen = np.array([row["time/generate"] + row["time/reshard"] for row in rows])[warmup:]
    score = np.array([row["time/score"] for row in rows])[warmup:]
    train_s = cycle - gen - score
    new_tokens = np.array([row["response_length"] for row in rows])[warmup:] * r.batch_size
    slots = r.batch_size * (r.prompt_len + r.max_new_tokens)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} x{jax.device_count()}, jax {jax.__version__}")
    for name in ("policy", "value"):
        m = cfgs[name]
        print(
            f"{name}: {model.num_params(m) / 1e9:.3f}B params, {m.n_layers} layers, d {m.d_model}, "
            f"attention {m.attention_impl}, remat {m.remat}, dtype {m.dtype}/{m.param_dtype}"
        )
    print(
        f"rollout: {r.batch_size} prompts x ({r.prompt_len} prompt + {r.max_new_tokens} new tokens), "
        f"{r.epochs} epoch(s) of minibatches of {c.train.batch_size} "
        f"(micro-batches {c.train.micro_batches}), "
        f"ptx ratio {c.ptx.ratio}; EMA, ref and reward model included"
    )
    hdr = (
        f"{'rollouts':>8} {'generate s':>10} {'score s':>8} {'train s':>8} {'total s':>8} {'tokens/s':>9} "
        f"{'gen tok/s':>10} {'mean len':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    print(
        f"{len(cycle):8d} {gen.mean():10.2f} {score.mean():8.2f} {train_s.mean():8.2f} {cycle.mean():8.2f} "
        f"{slots / cycle.mean():9.0f} {new_tokens.mean() / cycle.mean():10.0f} "
        f"{new_tokens.mean() / r.batch_size:8.1f}"
    )
    stats = dev.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"peak device memory: {stats['peak_bytes_in_use'] / 2**30:.1f} GiB; last loss {loss:.4f}")
    else:
        print(f"last loss {loss:.4f}")


if __name__ == "__main__":
    app.run(main)
