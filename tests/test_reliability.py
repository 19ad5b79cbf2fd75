"""No lost work: non-finite steps (skip / stop), SIGTERM, damaged checkpoints, a kill during a save, and the
errors a new user meets first (undecodable data, a bad workdir)."""

import collections
import glob
import logging
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import CHECKPOINT_CFG, TINY, logged, script_env, tiny_config, toy_state

from gptjax import checkpoint, data, train
from gptjax.data import sources as data_sources
from gptjax.train import defaults, guard, sources, state, step


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_train_step_skips_a_nonfinite_update():
    def loss_fn(params, batch, rng, ctx):
        err = batch["x_B4"] @ params["w"] - batch["y_B"]
        return jnp.sum(err**2), {"loss": (jnp.sum(err**2), jnp.float32(err.shape[0]))}

    opt = optax.adam(0.1)
    st = state.create({"w": jnp.ones(4)}, opt, ema=True)
    train_step = step.make_train_step(loss_fn, opt, ema_decay=0.5)
    ctx = step.Ctx(model_cfg=None)
    batch = {"x_B4": jnp.arange(8.0).reshape(2, 4), "y_B": jnp.ones(2)}
    st, m = train_step(st, batch, jax.random.key(0), ctx)
    assert float(m["skipped"]) == 0 and int(st.step) == 1
    for bad in (np.nan, np.inf):
        before = _leaves((st.params, st.opt_state, st.ema_params))
        st, m = train_step(st, {**batch, "y_B": jnp.array([1.0, bad])}, jax.random.key(0), ctx)
        assert float(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
        for a, b in zip(before, _leaves((st.params, st.opt_state, st.ema_params)), strict=True):
            np.testing.assert_array_equal(a, b)  # params, Adam moments and count, EMA: untouched
    assert int(st.step) == 3  # the consumed batches still count


def test_nonfinite_policies_name_the_step_and_the_batch():
    where = {"batches": 6, "consumed": 48, "offset": 0}
    skip = guard.NonFinite("skip", max_in_a_row=2)
    skip.check(4, {"skipped": 1.0, "loss": float("nan")}, where)
    skip.check(5, {"skipped": 0.0, "loss": 2.0}, where)  # a finite step resets the run of skips
    skip.check(6, {"skipped": 1.0, "loss": float("nan")}, where)
    assert skip.row() == {"skipped": 2.0} and skip.row() == {"skipped": 0.0}
    with pytest.raises(FloatingPointError, match=r"steps 6\.\.7: .* 2 times in a row .*lower optim.lr"):
        skip.check(7, {"skipped": 1.0, "loss": float("inf")}, where)
    with pytest.raises(FloatingPointError, match=r'step 3: non-finite .*\{"batches": 6, "consumed": 48'):
        guard.NonFinite("stop", 10).check(3, {"skipped": 1.0, "loss": float("nan")}, where)


class Planted:
    """A data source that spoils the batch of some steps (NaN weights) and sends SIGTERM at one."""

    def __init__(self, inner, nan_at=(), sigterm_at=None):
        self.inner, self.nan_at, self.sigterm_at = inner, nan_at, sigterm_at

    def next(self, train_state=None):
        batch = self.inner.next(train_state)
        step_ = self.inner.get_state()["batches"]  # the step this batch is for (1-based, survives a resume)
        if step_ in self.nan_at:
            batch = {**batch, "weights_BL": batch["weights_BL"] * np.float32("nan")}
        if step_ == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice while the step is under way
        return batch

    def position(self):
        return self.inner.get_state()

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, s):
        self.inner.set_state(s)


def _plant(monkeypatch, **kw):
    make = sources.make_source
    monkeypatch.setattr(sources, "make_source", lambda *a, **k: Planted(make(*a, **k), **kw))


def test_nan_skip_then_sigterm_then_resume_under_stop(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    workdir = str(tmp_path / "run")
    over = {**TINY, "train.steps": 8, "train.checkpoint_every": 3}
    # Run 1: step 2's batch is NaN (skipped), SIGTERM arrives during step 5.
    _plant(monkeypatch, nan_at=(2,), sigterm_at=5)
    with pytest.raises(guard.Interrupted) as stopped:
        train.run(tiny_config("pretrain", **over), workdir)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "resume from step 5" in str(stopped.value) and "checkpoints/5" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone again
    assert '"batches": 1' in caplog.text  # the skipped step names its batch (read after 1 batch)
    rows = {r["step"]: r for r in logged(workdir)}
    assert rows[2]["skipped"] == 1 and np.isnan(rows[2]["loss"]) and rows[3]["skipped"] == 0
    mngr = checkpoint.manager(workdir, create=False)
    assert mngr.all_steps() == [3, 5]
    cfg, params = checkpoint.load_model(workdir)
    assert all(np.isfinite(x).all() for x in _leaves(params))

    # Run 2, same workdir, policy 'stop': resumes at 5 and stops at once on the NaN batch of step 7.
    caplog.clear()
    _plant(monkeypatch, nan_at=(7,))
    c = tiny_config("pretrain", **over, **{"train.nonfinite": "stop"})
    with pytest.raises(FloatingPointError, match=r'step 7: non-finite .*"batches": 6'):
        train.run(c, workdir)
    assert "from its checkpoint at step 5" in caplog.text
    assert checkpoint.manager(workdir, create=False).all_steps() == [3, 5, 6]  # never the NaN state
    assert [r["step"] for r in logged(workdir)] == [1, 2, 3, 4, 5, 6]  # each step once


def _save(workdir, *steps):
    mngr = checkpoint.manager(workdir, keep=10)
    for k in steps:
        meta = checkpoint.meta_for(CHECKPOINT_CFG, "pretrain")
        checkpoint.save(mngr, toy_state(k), data_state={"k": k}, meta=meta)
    mngr.wait_until_finished()
    return mngr


def _damage(workdir, step_, how):
    d = os.path.join(workdir, "checkpoints", str(step_), "params")
    if how == "metadata":
        os.remove(os.path.join(d, "_METADATA"))
        return
    for f in glob.glob(os.path.join(d, "**", "d", "*"), recursive=True):
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _files(workdir):
    return sorted(os.path.relpath(f, workdir) for f in glob.glob(f"{workdir}/**", recursive=True))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax, after a failed read
def test_damaged_checkpoints_fall_back_to_the_newest_intact_one(tmp_path, caplog):
    workdir = str(tmp_path)
    mngr = _save(workdir, 1, 2, 3)
    _damage(workdir, 3, "truncate")
    _damage(workdir, 2, "metadata")
    target = toy_state(0)
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"step 2 is damaged: .*2/params/_METADATA: missi"):
        checkpoint.restore(mngr, target, 2)  # not "does not match the model config"
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"step 2 is damaged"):
        checkpoint.load_params(workdir, target.params, step=2)
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"step 3 is damaged: .*3/params/(.*/)?d/\w+: "):
        checkpoint.restore(mngr, target, 3)  # names the cut-short file, not 200 lines of TensorStore
    with pytest.raises(ValueError, match="holds no EMA weights"):  # a config change, not damage
        checkpoint.restore(mngr, target.replace(ema_params=target.params), 1)

    before = _files(workdir)
    restored, data_state, step_ = checkpoint.restore_latest(mngr, target)
    assert step_ == 1 and data_state == {"k": 1}
    for a, b in zip(_leaves(toy_state(1)), _leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "step 3 is damaged" in caplog.text and "step 2 is damaged" in caplog.text
    # nothing deleted: the damaged steps moved aside whole, so the resumed run can write steps 2 and 3 again
    after = [f.replace("checkpoints-damaged", "checkpoints") for f in _files(workdir)]
    assert sorted(after) == sorted(before + ["checkpoints"])
    assert mngr.all_steps() == [1]
    _save(workdir, 2)

    _damage(workdir, 1, "truncate")
    _damage(workdir, 2, "metadata")
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"no intact checkpoint(.|\n)*step 2(.|\n)*step 1"):
        checkpoint.restore_latest(checkpoint.manager(workdir), target)


# Saves steps 1, 2, ... `last` and SIGKILLs itself while the last is being written (saves are async).
SAVER = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from helpers import toy_state
from gptjax import checkpoint
mngr = checkpoint.manager(sys.argv[1], keep=100)
for k in range(1, int(sys.argv[3]) + 1):
    checkpoint.save(mngr, toy_state(k), data_state={"k": k}, meta={})
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_kill_during_a_save_leaves_every_earlier_checkpoint_intact(tmp_path):
    last = 3  # killed while step 3 is being written: steps 1 and 2 are committed
    env = script_env()
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-c", SAVER, str(tmp_path), os.path.dirname(__file__), str(last)]
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=300).returncode == -signal.SIGKILL
    names = os.listdir(tmp_path / "checkpoints")
    assert any(n.startswith(f"{last}.") for n in names), names  # killed inside the save: its temp dir
    mngr = checkpoint.manager(str(tmp_path))
    assert mngr.all_steps() == list(range(1, last))
    restored, data_state, step_ = checkpoint.restore_latest(mngr, toy_state(0))
    assert step_ == last - 1 and data_state == {"k": step_}
    for a, b in zip(_leaves(toy_state(step_)), _leaves(restored), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not (tmp_path / "checkpoints-damaged").exists()


def _read(path, fmt="text"):
    src = data.source(format=fmt, path=str(path))
    return data_sources.read("main", src, "train", None, None, collections.Counter())


def test_undecodable_data_names_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not UTF-8 \(byte 0xe9, byte 14 of the line\)"):
        _read(bad)
    txt = tmp_path / "bad.txt"
    txt.write_bytes(b"first document\n\nsecond\nthird \xff line\n")
    with pytest.raises(ValueError, match=r"bad\.txt:4: not UTF-8 \(byte 0xff, byte 7 of the line\)"):
        _read(txt)
    for line, col, msg in [('{"text": "broken', 10, "Unterminated string"), ('{"text": 1', 11, "delimiter")]:
        bad.write_text('{"text": "ok"}\n' + line + "\n")
        with pytest.raises(
            ValueError, match=rf"bad\.jsonl:2: malformed JSON line \(.*{msg}.* column {col}\)"
        ):
            _read(bad)


def test_workdir_errors_and_no_empty_workdir_after_an_early_failure(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    c = tiny_config("pretrain", **TINY)
    with pytest.raises(ValueError, match=r"--workdir .*afile' is a file"):
        train.run(c, str(afile))
    with pytest.raises(ValueError, match=r"--workdir .*afile/run' cannot be created \(Not a directory\)"):
        train.run(c, str(afile / "run"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    c.data = defaults.own_data("pretrain", str(bad))
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        train.run(c, str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()  # a workdir that was there before the run is left alone
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        train.run(c, str(tmp_path / "mine"))
    assert (tmp_path / "mine").is_dir()


class Crash(Exception):
    """The process dying at a random moment, as seen from the loop (the saves under way still commit)."""


class CrashAt:
    """A batch source that dies when asked for the batch of step ``at``."""

    def __init__(self, inner, at):
        self.inner, self.at, self.calls = inner, at, 0

    def next(self, train_state=None):
        self.calls += 1
        if self.calls == self.at:
            raise Crash(f"killed before step {self.at}")
        return self.inner.next(train_state)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_a_run_killed_at_a_random_step_resumes_bitwise(stage, tmp_path, monkeypatch):
    """SFT, the reward model and DPO (its frozen reference included): killed at a step between
    checkpoints, rerun: the final params, optimizer state, EMA and step rows equal an uninterrupted run's."""
    over = {**TINY, "train.steps": 7, "train.checkpoint_every": 2, "train.keep_checkpoints": 10}
    if stage in ("rm", "dpo"):
        over.pop("train.seq_len")  # the ranking batches keep their own length
    if stage == "dpo":  # DPO starts from an SFT model, its frozen reference
        train.run(tiny_config("sft", **{**TINY, "train.steps": 2}), str(tmp_path / "sft"))
        over["train.init_from"] = str(tmp_path / "sft")
    c = tiny_config(stage, **over)
    c.optim.ema_decay = 0.9
    train.run(c, str(tmp_path / "whole"))
    # the step whose batch is never read: after an uncheckpointed step (redone on resume) or right after a
    # checkpoint (nothing redone)
    kill_at = {"sft": 4, "rm": 6, "dpo": 5}[stage]
    make = sources.make_source
    monkeypatch.setattr(sources, "make_source", lambda *a, **k: CrashAt(make(*a, **k), kill_at))
    with pytest.raises(Crash):
        train.run(c, str(tmp_path / "killed"))
    monkeypatch.setattr(sources, "make_source", make)
    train.run(c, str(tmp_path / "killed"))
    runs = {}
    for name in ("whole", "killed"):
        mngr = checkpoint.manager(str(tmp_path / name), create=False)
        template = checkpoint.restore_latest(mngr, _state_like(c))
        runs[name] = template[0]
    assert int(runs["killed"].step) == 7, f"killed at step {kill_at}"
    for a, b in zip(_leaves(runs["whole"]), _leaves(runs["killed"]), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"killed before step {kill_at}")
    assert [r["step"] for r in logged(str(tmp_path / "killed"))] == list(range(1, 8))


def _state_like(c):
    """A fresh train state of the config's shapes (what a resume restores into)."""
    from gptjax import model
    from gptjax.train import optim, roles, stages

    cfg = roles.trained_roles(c, stages.get(c.stage))[0].cfg
    params = model.init(cfg, jax.random.key(0))
    return state.create(params, optim.make_optimizer(c.optim, c.train.steps), ema=True)
