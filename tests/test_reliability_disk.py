"""A workdir the run cannot write and a full disk end in one line naming the path and the fix: before anything
is built (a read-only workdir, its checkpoints folder or metrics file, a parent where it cannot be made, too
little space for one checkpoint), or at the save that meets them, with the earlier checkpoints intact.

Run as root, permission bits stop nothing: an unwritable path is simulated at ``os.open`` / ``os.mkdir``
(what the checks call), and, where the kernel lets an unprivileged process make a user and mount namespace,
made real there, root or not: read-only bind mounts and a small tmpfs that fills up."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import orbax.checkpoint as ocp
import pytest
from helpers import CHECKPOINT_CFG, ROOT, TINY, tiny_config, toy_state

from gptjax import checkpoint, train
from gptjax.checkpoint import disk
from gptjax.train import build


def _refuse(monkeypatch, call, refused, err):
    """``os.<call>`` (what the checks call) failing with ``err`` where ``refused(path)``, else as usual."""
    real = getattr(os, call)

    def fake(path, *args, **kw):
        if refused(os.path.abspath(path)):
            raise OSError(err, os.strerror(err), path)
        return real(path, *args, **kw)

    monkeypatch.setattr(os, call, fake)


ROFS, DENIED = "(Read-only file system)", "(Permission denied)"
# what cannot be written: (the failing call, errno, the message's start, its fix)
CASES = {
    "workdir": ("open", errno.EROFS, "--workdir '{w}' is not writable " + ROFS, "remount it read-write"),
    "checkpoints": (
        "open",
        errno.EACCES,
        "{w}/checkpoints is not writable, though --workdir '{w}' is",
        "mode",
    ),
    "metrics.jsonl": ("open", errno.EACCES, "{w}/metrics.jsonl cannot be written " + DENIED, "mode"),
    "parent": ("mkdir", errno.EACCES, "--workdir '{w}' cannot be created " + DENIED + ": its parent", "mode"),
}


@pytest.mark.parametrize("what", CASES)
def test_an_unwritable_workdir_is_one_line_before_anything_is_built(tmp_path, monkeypatch, what):
    call, err, start, fix = CASES[what]
    workdir = str(tmp_path / "run")
    if what != "parent":  # an earlier run's workdir
        os.makedirs(os.path.join(workdir, "checkpoints"))
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            f.write('{"step": 1}\n')
    before = sorted(os.listdir(workdir)) if what != "parent" else None
    folder = {"workdir": workdir, "checkpoints": os.path.join(workdir, "checkpoints")}.get(what)
    if folder:  # no file can be made in it
        _refuse(monkeypatch, call, lambda p: os.path.dirname(p) == folder, err)
    else:  # the file cannot be opened, or the workdir made
        path = workdir if what == "parent" else os.path.join(workdir, what)
        _refuse(monkeypatch, call, lambda p: p == path, err)

    def built(*a, **k):
        raise AssertionError("the run was built")

    monkeypatch.setattr(build, "build", built)
    with pytest.raises(disk.NotWritable) as e:
        train.run(tiny_config("pretrain", **TINY), workdir)
    monkeypatch.undo()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(start.format(w=workdir)), msg
    assert fix in msg and msg.endswith("or choose another --workdir")
    assert isinstance(e.value, ValueError) and e.value.errno == err
    if what == "parent":
        assert f"its parent folder {tmp_path} is not writable" in msg and not os.path.exists(workdir)
    else:  # left as it was: no lock, no probe file
        assert sorted(os.listdir(workdir)) == before
        assert os.listdir(os.path.join(workdir, "checkpoints")) == []


def test_too_little_space_for_one_checkpoint_is_refused_before_training(tmp_path, monkeypatch, caplog):
    st = toy_state(1)
    need = disk.state_bytes(st)
    directory = str(tmp_path / "checkpoints")
    usage = shutil.disk_usage(str(tmp_path))
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: usage._replace(free=need // 2))
    with pytest.raises(disk.DiskFull) as e:
        disk.check_space(directory, st, keep=3)
    msg = str(e.value)
    assert "\n" not in msg and e.value.errno == errno.ENOSPC
    assert msg.startswith(f"not started: too little space on the disk of {tmp_path} (")
    half, one = f"{need / 2**11:.1f} KiB", f"{need / 2**10:.1f} KiB"
    assert f"{half} free; one checkpoint of this run takes about {one}" in msg
    assert msg.endswith("free some space, or use another --workdir")
    # room for one, not for keep + 1: a warning only
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: usage._replace(free=need * 2))
    with caplog.at_level(logging.WARNING):
        disk.check_space(directory, st, keep=3)
    assert "less than the 4 checkpoints" in caplog.text


def test_a_save_meeting_a_read_only_folder_or_a_full_disk_is_one_line(tmp_path, monkeypatch):
    """The errors as the checkpoint library raises them: an OSError, or TensorStore's text in a ValueError
    from its writer thread; its own logs of them stay out of the console."""
    mngr = checkpoint.manager(str(tmp_path))
    meta = checkpoint.meta_for(CHECKPOINT_CFG, "pretrain")
    directory = str(mngr.directory)

    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(directory, "1.orbax-checkpoint-tmp"))

    monkeypatch.setattr(ocp.CheckpointManager, "save", read_only)
    with pytest.raises(disk.NotWritable) as e:
        checkpoint.save(mngr, toy_state(1), data_state={}, meta=meta)
    assert str(e.value) == (
        f"checkpoint not written: {directory} is not writable (Read-only file system writing {directory}/"
        "1.orbax-checkpoint-tmp); the checkpoints already there are left as they were: its file system is "
        "mounted read-only: remount it read-write, or choose another --workdir, and rerun to resume"
    )
    file = f"{directory}/1.orbax-checkpoint-tmp/params/ocdbt.process_0/d/0a1b"
    text = (
        f'RESOURCE_EXHAUSTED: Error writing "w_DD/0.0" in OCDBT database at local file "{directory}/1": '
        f'Failed writing: "{file}": Failed to write 1024 bytes to file 9: No space left on device '
        "[os_error_code='28']"
    )

    def thread_failed(self):
        raise ValueError(text)

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", thread_failed)
    with pytest.raises(disk.DiskFull) as e:
        mngr.wait_until_finished()
    assert f" free; No space left on device writing {file}); the checkpoints already in" in str(e.value)
    record = logging.LogRecord("absl", logging.ERROR, ocp.__file__, 1, "thread raised: %s", (text,), None)
    assert disk.reported_by_us(record)
    ours = logging.LogRecord("absl", logging.ERROR, __file__, 1, "thread raised: %s", (text,), None)
    assert not disk.reported_by_us(ours)  # only the checkpoint library's logs are left out


# Run in a user and mount namespace (as its root, which is this user outside): read-only bind mounts and a
# small tmpfs, made with `mount` there; prints what each case raised, as JSON.
REAL = r"""
import json, os, subprocess, sys
root, repo = sys.argv[1], sys.argv[2]
sys.path[:0] = [repo, os.path.join(repo, "tests")]
import jax, numpy as np, optax
from helpers import CHECKPOINT_CFG, TINY, tiny_config
from gptjax import checkpoint, train
from gptjax.train import state as state_lib

def toy_state(k):  # random numbers: a checkpoint of constants would compress to little
    r = np.random.default_rng(k)
    params = {"w_DD": r.normal(size=(256, 256)).astype(np.float32)}
    noise = lambda x: x + r.normal(size=x.shape).astype(x.dtype)  # noqa: E731
    opt_state = jax.tree.map(noise, optax.adam(0.1).init(params))
    return state_lib.TrainState(step=np.int32(k), params=params, opt_state=opt_state)

def mount(*args):
    subprocess.run(["mount", *args], check=True)

def read_only(path):
    mount("--bind", path, path)
    mount("-o", "remount,bind,ro", path)

out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = None
    except Exception as e:
        out[name] = [type(e).__name__, str(e)]

for name in ("workdir", "checkpoints", "parent"):
    read_only({"workdir": f"{root}/workdir/run", "checkpoints": f"{root}/checkpoints/run/checkpoints",
               "parent": f"{root}/parent"}[name])
    attempt(name, lambda: train.run(tiny_config("pretrain", **TINY), f"{root}/{name}/run"))

meta = checkpoint.meta_for(CHECKPOINT_CFG, "pretrain")
def first_then_second(where, between):
    mngr = checkpoint.manager(where)
    checkpoint.save(mngr, toy_state(1), data_state={"k": 1}, meta=meta)
    mngr.wait_until_finished()
    between()
    checkpoint.save(mngr, toy_state(2), data_state={"k": 2}, meta=meta)
    mngr.wait_until_finished()

# a save into a folder remounted read-only after its first checkpoint (as after a disk error)
where = f"{root}/remounted"
attempt("remounted", lambda: first_then_second(where, lambda: read_only(f"{where}/checkpoints")))
# a disk that fills up during the second checkpoint (each takes about 800 KiB), then has no room for one
mount("-t", "tmpfs", "-o", "size=1100k", "tmpfs", f"{root}/full")
attempt("full", lambda: first_then_second(f"{root}/full", lambda: None))
mngr = checkpoint.manager(f"{root}/full")
out["full_steps"] = mngr.all_steps()
out["full_restored"] = checkpoint.restore(mngr, toy_state(0), 1)[1]
attempt("full_before", lambda: checkpoint.disk.check_space(str(mngr.directory), toy_state(3), 3))
print("RESULT " + json.dumps(out))
"""


def _namespaces() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-rm", "mount", "-t", "tmpfs", "tmpfs", "/mnt"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.skipif(not _namespaces(), reason="no unprivileged user and mount namespaces on this machine")
def test_real_read_only_mounts_and_a_real_full_disk(tmp_path):
    for name in ("workdir/run/checkpoints", "checkpoints/run/checkpoints", "parent", "remounted", "full"):
        os.makedirs(tmp_path / name)
    proc = subprocess.run(
        ["unshare", "-rm", sys.executable, "-P", "-c", REAL, str(tmp_path), ROOT],
        capture_output=True,
        text=True,
        timeout=120,  # a writer thread left waiting on a step folder would hold the exit for 5 minutes
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    out = json.loads(line[len("RESULT ") :])
    fix = "its file system is mounted read-only: remount it read-write, or choose another --workdir"
    w, c, p = (f"{tmp_path}/{name}" for name in ("workdir/run", "checkpoints/run", "parent"))
    assert out["workdir"] == [
        "NotWritable",
        f"--workdir {w!r} is not writable {ROFS}: a run writes its checkpoints, metrics and lock there; "
        + fix,
    ]
    assert out["checkpoints"][0] == "NotWritable"
    assert out["checkpoints"][1].startswith(
        f"{c}/checkpoints is not writable, though --workdir {c!r} is {ROFS}"
    )
    assert out["parent"] == [
        "NotWritable",
        f"--workdir '{p}/run' cannot be created {ROFS}: its parent folder {p} is not writable: {fix}",
    ]
    kind, msg = out["remounted"]
    assert kind == "NotWritable" and "\n" not in msg and msg.endswith(f"{fix}, and rerun to resume")
    assert msg.startswith(f"checkpoint not written: {tmp_path}/remounted/checkpoints is not writable {ROFS};")
    kind, msg = out["full"]
    assert kind == "DiskFull" and "\n" not in msg
    assert msg.startswith(f"checkpoint not written: no space left on the disk of {tmp_path}/full (")
    assert " free; No space left on device" in msg  # and the file, when the error names one
    assert msg.endswith("free some space (or use another --workdir) and rerun to resume")
    assert out["full_steps"] == [1] and out["full_restored"] == {"k": 1}  # the earlier checkpoint, intact
    kind, msg = out["full_before"]
    assert kind == "DiskFull"
    assert msg.startswith(f"not started: too little space on the disk of {tmp_path}/full (")
    # none of the checkpoint library's logged tracebacks of these failures (the lines above say them), and
    # no writer thread left waiting minutes for a step folder that was never made (the run ended at once)
    for noise in ("raised an exception", "Save Finalize thread", "Timeout waiting for key", "ERROR:absl"):
        assert noise not in proc.stderr, proc.stderr[-3000:]
