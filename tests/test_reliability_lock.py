"""One run per workdir (a second is refused naming the holder; a dead holder's lock is taken over), and a
resume past a checkpoint with one cut-short array file."""

import gc
import glob
import json
import logging
import os
import subprocess
import sys

import pytest
from helpers import CHECKPOINT_CFG, TINY, logged, tiny_config, toy_state

from gptjax import checkpoint, train
from gptjax.train import guard

# orbax's abandoned reads of a damaged step end as unraisable exceptions
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_a_second_run_on_a_locked_workdir_is_refused_naming_the_holder(tmp_path):
    workdir = str(tmp_path)
    with guard.WorkdirLock(workdir):
        holder = json.loads((tmp_path / guard.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
        # a second lock (its own open file, as another process has) is refused at once
        refused = rf"in use by another run: pid {os.getpid()} on host \S+ "
        with pytest.raises(guard.WorkdirLocked, match=refused):
            guard.WorkdirLock(workdir).acquire()
        # so is a run, before it builds anything, and it leaves the holder's workdir alone
        with pytest.raises(guard.WorkdirLocked, match=rf"pid {os.getpid()} .*started .*another --workdir"):
            train.run(tiny_config("pretrain", **TINY), workdir)
        assert (tmp_path / guard.LOCK_NAME).exists()
    assert not (tmp_path / guard.LOCK_NAME).exists()  # released: the workdir is free again
    guard.WorkdirLock(workdir).acquire().release()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="absl")
    # the holder takes the lock and is SIGKILLed: its file stays, its flock goes with it
    holder = (
        "import sys; sys.path.insert(0, sys.argv[2]); from gptjax.train import guard; "
        "guard.WorkdirLock(sys.argv[1]).acquire(); import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", holder, str(tmp_path), root], env=env, timeout=120)
    assert proc.returncode == -9
    dead = json.loads((tmp_path / guard.LOCK_NAME).read_text())["pid"]
    with pytest.raises(ProcessLookupError):  # the file still names the holder, which is gone
        os.kill(dead, 0)
    with guard.WorkdirLock(str(tmp_path)):
        assert json.loads((tmp_path / guard.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"took over the lock left by pid {dead} on host" in caplog.text


def test_one_truncated_array_file_resumes_from_the_newest_intact_step(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="absl")
    workdir = str(tmp_path / "run")
    over = {**TINY, "train.steps": 4, "train.checkpoint_every": 2}
    train.run(tiny_config("pretrain", **over), workdir)
    assert not os.path.exists(os.path.join(workdir, guard.LOCK_NAME))  # released at the end
    files = glob.glob(os.path.join(workdir, "checkpoints", "4", "params", "ocdbt.process_0", "d", "*"))
    os.truncate(max(files, key=os.path.getsize), 0)  # one array file cut to nothing; the rest intact

    # the run holds its lock while it resumes: a second one is refused then
    seen = []
    restore_latest = checkpoint.restore_latest

    def probe(mngr, state):
        with pytest.raises(guard.WorkdirLocked, match=rf"pid {os.getpid()} "):
            guard.WorkdirLock(workdir).acquire()
        seen.append(True)
        return restore_latest(mngr, state)

    monkeypatch.setattr(checkpoint, "restore_latest", probe)
    train.run(tiny_config("pretrain", **{**over, "train.steps": 6}), workdir)
    assert seen == [True]
    assert "checkpoint step 4 is damaged" in caplog.text and "OUT_OF_RANGE" in caplog.text
    assert "from its checkpoint at step 2" in caplog.text
    assert os.path.isdir(os.path.join(workdir, "checkpoints-damaged", "4", "params"))
    assert checkpoint.manager(workdir, create=False).latest_step() == 6
    assert [r["step"] for r in logged(workdir)][-4:] == [3, 4, 5, 6]  # steps 3 and 4 trained again
    gc.collect()  # orbax's abandoned reads of step 4 are reported now, under this file's warning filter


def test_another_models_shapes_stay_an_error_not_damage(tmp_path):
    mngr = checkpoint.manager(str(tmp_path))
    checkpoint.save(mngr, toy_state(1), data_state={}, meta=checkpoint.meta_for(CHECKPOINT_CFG, "pretrain"))
    mngr.wait_until_finished()
    other = toy_state(0)
    other = other.replace(params={**other.params, "b_D": other.params["b_D"][:8]})
    with pytest.raises(ValueError, match=r"does not match the model config:\n  b_D: checkpoint has \(256,\)"):
        checkpoint.restore_latest(mngr, other)
    assert mngr.all_steps() == [1] and not (tmp_path / "checkpoints-damaged").exists()
