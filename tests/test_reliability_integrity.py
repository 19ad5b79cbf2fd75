"""Checkpoints that changed on disk and runs that explode while staying finite: a bit flipped inside an array
file is damage (moved aside, the older step resumed), and a diverging run stops before it writes a checkpoint,
so rotation never deletes the last good one, also when the damage shows only in the loss after a save step's
update."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import CHECKPOINT_CFG, TINY, logged, tiny_config

from gptjax import checkpoint, train
from gptjax.train import build, guard
from gptjax.train import state as state_lib


def _random_state(k):
    """Incompressible arrays: a flipped bit lands in stored values, not in a compressed run of constants."""
    r = np.random.default_rng(k)
    params = {
        "w_DD": r.normal(size=(256, 256)).astype(np.float32),
        "b_D": r.normal(size=256).astype(np.float32),
    }
    opt_state = jax.tree.map(lambda x: x + k, optax.adam(1e-3).init(params))
    return state_lib.TrainState(step=jnp.int32(k), params=params, opt_state=opt_state)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_bit_flip_in_an_array_file_is_damage_and_the_older_step_resumes(tmp_path, caplog):
    workdir = str(tmp_path)
    mngr = checkpoint.manager(workdir, keep=10)
    for k in (1, 2):
        checkpoint.save(
            mngr, _random_state(k), data_state={"k": k}, meta=checkpoint.meta_for(CHECKPOINT_CFG, "pretrain")
        )
    mngr.wait_until_finished()
    meta = checkpoint.load_meta(workdir)[1]["checksums"]
    assert set(meta) == {"params", "opt"} and set(meta["params"]) == {"w_DD", "b_D"}
    # one bit flipped in place in the largest array file of the newest step: same size, still decodable
    files = glob.glob(os.path.join(workdir, "checkpoints", "2", "params", "**", "d", "*"), recursive=True)
    f = max(files, key=os.path.getsize)
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.seek(size // 2)
        byte = fh.read(1)[0]
        fh.seek(size // 2)
        fh.write(bytes([byte ^ 0x10]))
    assert os.path.getsize(f) == size
    target = _random_state(0)
    with pytest.raises(
        checkpoint.DamagedCheckpoint, match=r"step 2 is damaged: .*array params/w_DD does not"
    ):
        checkpoint.restore(mngr, target, 2)

    restored, data_state, step = checkpoint.restore_latest(mngr, target)
    assert step == 1 and data_state == {"k": 1}
    for a, b in zip(jax.tree.leaves(_random_state(1)), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "params/w_DD does not match its checksum" in caplog.text
    assert os.path.isdir(os.path.join(workdir, "checkpoints-damaged", "2")) and mngr.all_steps() == [1]


def test_a_finite_explosion_stops_the_run_before_any_checkpoint(tmp_path):
    workdir = str(tmp_path / "run")
    c = tiny_config("pretrain", **TINY, **{"train.steps": 3, "train.checkpoint_every": 1})
    c.optim.lr = 1e9
    with pytest.raises(
        guard.Diverged, match=r"step 1: the run diverged: update_norm=\S+ is more than half of param_norm"
    ):
        train.run(c, workdir)
    row = logged(workdir)[-1]
    assert row["step"] == 1 and np.isfinite(row["update_norm"]) and row["update_norm"] > row["param_norm"] / 2
    assert not glob.glob(os.path.join(workdir, "checkpoints", "[0-9]*"))  # nothing poisoned was written


def test_a_spike_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    check = guard.Divergence.check
    seen = []

    def spike_at_5(self, step, out):
        seen.append((step, out["update_norm"], out["loss"]))
        if step == 5:  # as an lr spike would: a finite update 1000x the usual one
            out = {**out, "update_norm": out["update_norm"] * 1000}
        return check(self, step, out)

    monkeypatch.setattr(guard.Divergence, "check", spike_at_5)
    over = {**TINY, "train.steps": 8, "train.checkpoint_every": 2, "train.keep_checkpoints": 1}
    with pytest.raises(guard.Diverged, match=r"step 5: .*update_norm=\S+ is 1\.\d+e\+03x its median"):
        train.run(tiny_config("pretrain", **over), workdir)
    # steps 1..4 of a normal tiny run pass the guard; step 4's checkpoint, the last before the spike, is kept
    assert [s for s, _, _ in seen] == [1, 2, 3, 4, 5]
    assert checkpoint.manager(workdir, create=False).all_steps() == [4]
    cfg, params = checkpoint.load_model(workdir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_an_update_seen_only_in_the_next_loss_is_not_saved_at_a_save_step(tmp_path, monkeypatch):
    """Step 4 (a save step) lands the params where the loss explodes while its own numbers (update and param
    norms, its loss, measured before the update) stay normal: the step after it would show it, after the
    save. The loss of the params about to be saved is measured first, so step 4 is never written."""
    make_step = build.Run.make_step

    def poisoned_at_4(self, batch):
        train_step = make_step(self, batch)

        def step(state, batch, rng, ctx):
            state, metrics = train_step(state, batch, rng, ctx)
            if int(state.step) == 4:  # finite, but far from where training was
                state = state.replace(params=jax.tree.map(lambda x: x * 1000, state.params))
            return state, metrics

        return step

    monkeypatch.setattr(build.Run, "make_step", poisoned_at_4)
    workdir = str(tmp_path / "run")
    over = {**TINY, "train.steps": 8, "train.checkpoint_every": 2, "train.keep_checkpoints": 1}
    with pytest.raises(guard.Diverged) as e:
        train.run(tiny_config("pretrain", **over), workdir)
    msg = str(e.value)
    assert msg.startswith("step 4: the run diverged: the params after this step's update have loss=")
    assert "on the step's own batch" in msg and "checkpoint is not written" in msg
    rows = logged(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # step 4 looked normal to the step's own checks
    assert rows[3]["update_norm"] < rows[3]["param_norm"] / 10
    assert checkpoint.manager(workdir, create=False).all_steps() == [2]  # kept; step 4 never written
    cfg, params = checkpoint.load_model(workdir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_the_guard_never_fires_on_a_normal_tiny_run(tmp_path):
    defaults_ = tiny_config("sft")
    assert defaults_.train.divergence_factor > 0  # on by default
    c = tiny_config("sft", **TINY, **{"train.steps": 12, "train.checkpoint_every": 12})
    train.run(c, str(tmp_path / "run"))
    rows = logged(str(tmp_path / "run"))
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert max(r["update_norm"] / r["param_norm"] for r in rows) < 0.1  # far from the guard's limits
