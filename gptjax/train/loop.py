"""``run(config, workdir)``: the one training loop for every stage.

Reads top to bottom: mesh -> model config -> data -> params (fresh, resumed or ``init_from``) -> one jitted
step -> loop (dispatch step t+1 before fetching step t's metrics) -> eval, checkpoints, logs.

No lost work (``gptjax.train.guard``): a step with a non-finite loss or gradients is skipped or stops the run
(``train.nonfinite``), so no checkpoint holds a non-finite state; SIGTERM / SIGINT end the run after the
current step with a checkpoint (exit status 128 + the signal); a resume takes the newest intact checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from ml_collections import ConfigDict
from tensorboardX import SummaryWriter
from tqdm import tqdm

from gptjax import checkpoint, evals, model
from gptjax.model import flops, sharding
from gptjax.train import build, guard, provenance, sources, stages
from gptjax.train import step as step_lib


def drop_rows_after(path: str, step: int) -> None:
    """Remove rows of ``metrics.jsonl`` logged after ``step`` (a run that died after its last checkpoint)."""
    if not os.path.exists(path):
        return

    def logged_by(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except json.JSONDecodeError:  # a row cut short by a kill
            return False

    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and logged_by(line)]
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
        logging.info(
            "metrics.jsonl: dropped %d row(s) after step %d (replayed)", len(lines) - len(kept), step
        )


def wandb_run(config: ConfigDict, workdir: str):
    """A Weights & Biases run beside TensorBoard when ``train.wandb_project`` names a project ('' = none):
    one W&B run per workdir (its id kept in the workdir, so a resume continues it; the replayed steps after
    the checkpoint are logged again), files under ``<workdir>/wandb``. ``WANDB_MODE=offline`` needs no
    network (``wandb sync`` uploads later)."""
    project = config.train.get("wandb_project", "")
    if not project:
        return None
    try:
        import wandb  # optional (the 'wandb' extra): only runs that log there need it
    except ImportError:
        raise ValueError(
            f"train.wandb_project={project!r} needs the wandb package: pip install 'gptjax[wandb]' (or set "
            "train.wandb_project='' to log to TensorBoard and metrics.jsonl only)"
        ) from None
    id_path = os.path.join(workdir, "wandb_run_id")
    if not os.path.exists(id_path):
        with open(id_path, "w") as f:
            f.write(secrets.token_hex(4))
    with open(id_path) as f:
        run_id = f.read().strip()
    run = wandb.init(
        project=project,
        dir=workdir,
        id=run_id,
        resume="allow",
        name=os.path.basename(os.path.abspath(workdir)),
        config=json.loads(config.to_json_best_effort()),
        # where the run is, not its 30-line summary at the end (WANDB_QUIET / WANDB_SILENT still choose)
        settings=None if {"WANDB_QUIET", "WANDB_SILENT"} & set(os.environ) else wandb.Settings(quiet=True),
    )
    run.define_metric("*", step_metric="step")  # our step: splits arrive out of order (rollout t+1, train t)
    return run


class MetricLog:
    """Console (progress bar), TensorBoard, metrics.jsonl in the workdir and, with ``train.wandb_project``,
    Weights & Biases; process 0 only."""

    def __init__(self, workdir: str, total: int, initial: int, config: ConfigDict | None = None):
        self.enabled = jax.process_index() == 0
        self.writer, self.bar, self.file, self.wandb = None, None, None, None
        if not self.enabled:
            return

        # A resumed run replays the steps after its checkpoint: purge_step hides the killed run's events for
        # them from TensorBoard, so no step is shown twice.
        self.tb_dir = os.path.join(workdir, "tb")
        self.writer = self._tb_writer(purge_step=initial + 1 if initial else None)
        path = os.path.join(workdir, "metrics.jsonl")
        drop_rows_after(path, initial)  # steps after the resumed checkpoint are replayed: log them once
        self.file = open(path, "a")
        self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, disable=not sys.stderr.isatty())
        self.wandb = wandb_run(config, workdir) if config is not None else None

    def write(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        for k, v in metrics.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({**{f"{prefix}/{k}": v for k, v in metrics.items()}, "step": step})
        self.file.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
        self.file.flush()
        text = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
        if self.bar.disable:
            logging.info("[%s] step %d %s", prefix, step, text)
        else:
            self.bar.write(f"[{prefix}] step {step} {text}")

    def _tb_writer(self, purge_step: int | None = None):

        # Event files named by the time in ns: they sort in the order they were written, and no two share a
        # name (tensorboardX names a file by the second and would truncate an existing one).
        return SummaryWriter(self.tb_dir, purge_step=purge_step, filename_suffix=f".{time.time_ns()}")

    def flush(self) -> None:
        """Make every logged row durable: done at each checkpoint, so a killed run loses no row it will not
        replay. TensorBoard events go through a writer thread whose flush() leaves queued events unwritten:
        close() drains it, and the rows after the checkpoint go to a new event file."""
        if self.enabled:
            self.writer.close()
            self.writer = self._tb_writer()

    def advance(self, loss: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix_str(f"loss={loss:.4f}")

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()


def validation_metrics(
    eval_step, params, ctx, eval_source, start_state: dict, steps: int, mesh, rng
) -> dict[str, float]:
    """Metrics over the first ``steps`` validation batches (the same batches at every evaluation)."""
    eval_source.set_state(start_state)
    totals: dict[str, Any] = {}
    for i in range(steps):
        m = eval_step(params, sharding.shard_batch(eval_source.next(), mesh), jax.random.fold_in(rng, i), ctx)
        totals = m if not totals else jax.tree.map(jnp.add, totals, m)
    return {k: float(v) for k, v in jax.device_get(step_lib.reduce_metrics(totals)).items()}


def loss_after_update(eval_step, params, batch, rng, ctx, mesh, t: ConfigDict) -> float:
    """The loss of ``params`` on ``batch``, the batch of the update that made them (in the step's
    micro-batches, so that it needs no more memory than the step)."""
    totals: dict[str, Any] = {}
    for i in range(t.micro_batches):
        part = jax.tree.map(lambda x, i=i: x[i :: t.micro_batches], batch)
        m = eval_step(params, sharding.shard_batch(part, mesh), rng, ctx)
        totals = m if not totals else jax.tree.map(jnp.add, totals, m)
    return float(jax.device_get(step_lib.reduce_metrics(totals))["loss"])


def run(config: ConfigDict, workdir: str) -> dict[str, float]:
    """Train one stage; resumes from ``workdir`` if it holds a checkpoint. Returns the last train metrics."""
    sharding.maybe_initialize_distributed()
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir!r} is a file, not a directory: choose another path")
    stage = stages.of_config(config)
    mesh = sharding.make_mesh(config.mesh)
    build.trained_roles(config, mesh)  # the config's checks, before the workdir is made
    evals.configured(config)  # an unknown evaluator or option: named before anything is made
    created = guard.make_workdir(workdir)  # a workdir this process cannot write: one line, now
    lock = guard.WorkdirLock(workdir).acquire()  # a second run on this workdir is refused here, naming us
    try:
        prepare = stages.prepare_fn(stage)
        if prepare is not None:  # e.g. rejection sampling writes its demonstrations into the workdir
            config = prepare(config, workdir)
        # The mesh in context lets kernels that need shard_map (Pallas attention) split work per device.
        with jax.set_mesh(mesh):
            return _train(config, workdir, mesh, stage)
    except BaseException:
        if created and jax.process_index() == 0:  # failed before its first step: leave no empty workdir
            guard.remove_unused_workdir(workdir)
        raise
    finally:
        lock.release()


def _train(config: ConfigDict, workdir: str, mesh, stage) -> dict[str, float]:
    t = config.train
    rng = jax.random.key(t.seed)
    init_rng, train_rng, eval_rng = jax.random.split(rng, 3)
    run_ = build.build(config, mesh, rng=init_rng)
    roles, train_state, ctx, source = run_.roles, run_.state, run_.ctx, run_.source
    mngr = checkpoint.manager(workdir, keep=t.keep_checkpoints)
    checkpoint.disk.check_space(str(mngr.directory), train_state, t.keep_checkpoints)  # room for one
    run_identity = provenance.identity(config)
    meta = checkpoint.meta_for(
        roles[0].cfg,
        config.stage,
        roles={r.name: r.cfg for r in roles},
        config=config.to_json_best_effort(),
        identity=run_identity,  # config, data fingerprints, upstream checkpoints: compared on resume
    )
    resumed = checkpoint.restore_latest(mngr, train_state)  # the newest intact checkpoint, if any
    if resumed is not None:
        train_state, source_state, resumed_step = resumed
        recorded = checkpoint.load_meta(workdir, resumed_step)[1]
        provenance.check(recorded, run_identity, t.get("resume_changes", ""), workdir, resumed_step)
        source.set_state(source_state)
        logging.info("resuming %s from its checkpoint at step %d", workdir, resumed_step)

    ctx = ctx.replace(scalars=build.scalars(stage, source))
    where = guard.position(source)  # the batch's identity, named if its step is not finite
    first = source.next(train_state)  # its shapes fix the batch shardings; it is still the first step's batch
    train_step = run_.make_step(first)
    eval_step = run_.make_eval_step()
    eval_source = eval_start = None
    if t.eval_every:
        per_host = t.batch_size // jax.process_count()
        eval_source = sources.make_source(config, stage, batch_size=per_host, split="validation")
        eval_start = eval_source.get_state()

    start = int(jax.device_get(train_state.step))
    log = MetricLog(workdir, t.steps, start, config)
    evaluators = evals.Runner(config, workdir, run_, eval_rng)  # config.evals, on their own cadence
    speed = Speed(
        sum(model.flops_per_token(r.cfg, t.seq_len) for r in roles),
        flops.peak_flops(jax.devices()[0]),
        batch_tokens(first) * jax.process_count(),
    )
    finish = stages.finish_fn(stage)  # a stage's last touch before its final checkpoint (RM: normalise)
    if finish is not None and start < t.steps:
        finish(config, None, ctx, mesh)  # check its inputs now, not after the whole run
    nonfinite = guard.NonFinite(t.nonfinite, t.max_nonfinite_in_a_row)
    divergence = guard.Divergence(t.divergence_factor, t.divergence_window)  # checked before each save
    pending, last = None, {}
    # SIGTERM / SIGINT (with several processes: JAX's preemption notice) finish the step, checkpoint and stop;
    # closing the manager commits the saves under way, also when the loop raises.
    preempted = mngr.reached_preemption if jax.process_count() > 1 else None
    with guard.Signals(preempted) as signals, contextlib.closing(mngr):
        for step in range(start, t.steps):
            if first is not None:
                batch, first = first, None
            else:
                where = guard.position(source)
                batch = source.next(train_state)
            extra = pop_metrics(source)  # a rollout source's numbers for the rollout this step starts using
            if extra:
                log.write(step + 1, extra, "rollout")
            if ctx.scalars:  # e.g. an adaptive KL coefficient the source updates: traced, so no recompile
                ctx = ctx.replace(scalars=build.scalars(stage, source))
            train_state, metrics = train_step(train_state, sharding.shard_batch(batch, mesh), train_rng, ctx)
            if pending is not None:  # fetch step t-1's metrics only after step t is dispatched
                last = _flush(log, speed, nonfinite, pending, t, divergence)
            pending = (step, metrics, where)
            if t.eval_every and ((step + 1) % t.eval_every == 0 or step + 1 == t.steps):
                metrics = validation_metrics(
                    eval_step, train_state.params, ctx, eval_source, eval_start, t.eval_steps, mesh, eval_rng
                )
                log.write(step + 1, metrics, "eval")
            if step + 1 == t.steps and finish is not None:
                train_state, extra = finish(config, train_state, ctx, mesh)
                log.write(step + 1, extra, "finish")
            evaluators.after_step(step + 1, train_state, ctx, log)  # logged before the step's checkpoint
            stop = signals.stop_after(step + 1)
            if (step + 1) % t.checkpoint_every == 0 or step + 1 == t.steps or stop:
                if pending is not None:  # the step's row is logged (and checked) before its checkpoint exists
                    last, pending = _flush(log, speed, nonfinite, pending, t, divergence), None
                if divergence.judges_loss():  # this step's update shows in the loss only after it: look now
                    loss = loss_after_update(eval_step, train_state.params, batch, train_rng, ctx, mesh, t)
                    divergence.check_saved(step + 1, loss)
                log.flush()
                # a run that trained nothing ends with no checkpoint and no exit 0; the save refuses NaN / inf
                if step + 1 == t.steps:
                    nonfinite.check_not_all_skipped(step + 1)
                checkpoint.save(mngr, train_state, data_state=source.get_state(), meta=meta)
            if stop and step + 1 < t.steps:
                mngr.wait_until_finished()
                log.close()
                interrupted = guard.Interrupted(stop, step + 1, checkpoint.step_path(mngr, step + 1))
                logging.warning("%s", interrupted)
                raise interrupted
        if pending is not None:
            last = _flush(log, speed, nonfinite, pending, t, divergence)
    log.close()
    return last


def pop_metrics(source) -> dict[str, float]:
    """Metrics the source produced since the last call (``source.pop_metrics()``, optional)."""
    pop = getattr(source, "pop_metrics", None)
    return pop() if pop else {}


def batch_tokens(batch: dict) -> int:
    for key in ("inputs_BL", "tokens_BKL", "tokens_BL"):
        if key in batch:
            return int(np.prod(batch[key].shape))
    raise KeyError(f"cannot count tokens in a batch with keys {sorted(batch)}")


@dataclasses.dataclass
class Speed:
    """tokens/s and MFU over the steps between two logged steps."""

    flops_per_token: float
    peak: float | None
    tokens_per_step: int
    since: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0

    def measure(self) -> dict[str, float]:
        now = time.perf_counter()
        tps = self.tokens_per_step * self.steps / max(now - self.since, 1e-9)
        self.since, self.steps = now, 0
        out = {"tokens_per_s": tps}
        mfu = flops.mfu(self.flops_per_token, tps, self.peak, jax.device_count())
        if mfu is not None:
            out["mfu"] = mfu
        return out


def _flush(
    log: MetricLog,
    speed: Speed,
    nonfinite: guard.NonFinite,
    pending: tuple,
    t: ConfigDict,
    divergence: guard.Divergence | None = None,
):
    """Fetch one step's metrics, apply the non-finite policy and the divergence guard to them (every step is
    flushed before its checkpoint is written, so a diverged step is never saved), log them on logging
    steps."""
    step, metrics, where = pending
    out = {k: float(v) for k, v in jax.device_get(metrics).items()}
    nonfinite.check(step + 1, out, where)
    if divergence is not None:
        try:
            divergence.check(step + 1, out)
        except guard.Diverged:
            log.write(step + 1, out)  # the diverged step's numbers stay in the log beside the error
            raise
    speed.steps += 1
    log.advance(loss=out.get("loss"))
    if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
        out.update(speed.measure())
        out.update(nonfinite.row())
        log.write(step + 1, out)
    return out
