"""Multi-host: 2 processes on localhost (4 CPU devices each, jax.distributed, each reading its own data shard)
train exactly as 1 process with 8 devices on the same global batches."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
from helpers import script_env

WORKER = os.path.join(os.path.dirname(__file__), "multihost_steps.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env():
    env = script_env()  # the worker sets its own device count
    env.pop("JAX_COORDINATOR_ADDRESS", None)
    return env


def test_two_processes_train_like_one_with_all_devices(tmp_path):
    port = _free_port()
    two = str(tmp_path / "two.json")
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, two, "2", str(pid), str(port)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    one = str(tmp_path / "one.json")
    ref = subprocess.run([sys.executable, WORKER, one, "1"], env=_env(), capture_output=True, text=True)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert ref.returncode == 0, ref.stderr[-3000:]
    with open(one) as f:
        want = json.load(f)
    with open(two) as f:
        got = json.load(f)
    assert len(got) == len(want) == 5
    losses = [r["loss"] for r in want]
    assert losses[-1] < losses[0]  # it trains
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g["loss"], w["loss"], rtol=2e-5)
        np.testing.assert_allclose(g["grad_norm"], w["grad_norm"], rtol=1e-4)
