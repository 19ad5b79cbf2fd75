"""Bad ranking data and failing checkpoint writes end in one clear line: NaN scores name their file and line,
K < 2 and responses identical after the length cut are counted (or the source refused), a ``checkpoints``
file is refused before training, and a full disk names the workdir and its free space."""

import errno
import json
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers import CHECKPOINT_CFG

from gptjax import checkpoint, data, model
from gptjax.checkpoint import store
from gptjax.train import defaults, optim, state

pytest.importorskip("seqio")


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _it(path, seq_len=48, overflow="auto"):
    cfg = data.default_config()
    cfg.sources.r = data.source(format="rank", path=path)
    cfg.overflow = overflow
    return data.make_iterator(
        cfg, stage="rm", batch_size=2, seq_len=seq_len, seed=0, shard_index=0, num_shards=1
    )


GOOD = [{"prompt": f"q{i}", "responses": [f"a{i}", f"b{i}"]} for i in range(4)]


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_nonfinite_score_refused_with_file_and_line(tmp_path, bad):
    rows = [json.dumps(r) for r in GOOD[:2]]
    rows.append(json.dumps({"prompt": "p", "responses": ["a", "b", "c"], "scores": [float(bad), 1, 0]}))
    path = _write_jsonl(tmp_path / "rank.jsonl", rows)
    with pytest.raises(ValueError, match=r"rank\.jsonl:3: field 'scores'\[0\] is .*finite"):
        _it(path)


def test_fewer_than_two_responses_counted_under_own_name(tmp_path):
    rows = GOOD + [{"prompt": "one", "responses": ["only"]}, {"prompt": "none", "responses": []}]
    stats = _it(_write_jsonl(tmp_path / "rank.jsonl", rows)).stats()
    assert stats["r/rank_records_dropped_fewer_than_2_responses"] == 2
    assert "r/rank_records_dropped_ties" not in stats
    assert stats["r/examples"] == 4


def test_identical_after_cut_dropped_and_counted(tmp_path):
    # Responses that differ only after the 16-token cut become one response; the third stays distinct.
    long = [{"prompt": f"z{i}", "responses": ["s" * 30 + "x", "s" * 30 + "y", "t"]} for i in range(2)]
    it = _it(_write_jsonl(tmp_path / "rank.jsonl", GOOD + long), seq_len=16, overflow="truncate")
    stats = it.stats()
    assert stats["r/ranked_responses_dropped_identical_after_cut"] == 2
    assert stats["r/rankings_with_responses_identical_after_cut"] == 2
    assert stats["r/examples"] == 6  # the two cut rankings keep their two distinct responses
    b = next(it)
    for toks, valid in zip(b["tokens_BKL"], b["valid_BK"], strict=True):
        seqs = [tuple(t) for t, v in zip(toks, valid, strict=True) if v]
        assert len(set(seqs)) == len(seqs) >= 2


def test_identical_after_cut_in_most_rankings_refused(tmp_path):
    long = [{"prompt": f"z{i}", "responses": ["s" * 30 + "x", "s" * 30 + "y"]} for i in range(5)]
    path = _write_jsonl(tmp_path / "rank.jsonl", GOOD + long)
    with pytest.raises(ValueError, match=r"data source 'r'.*5 of 9 rankings.*raise train\.seq_len"):
        _it(path, seq_len=16, overflow="truncate")


def test_checkpoints_file_refused_before_training(tmp_path):
    from helpers import tiny_config

    from gptjax import train

    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("not a directory")
    with pytest.raises(ValueError, match=r"checkpoints is a file, not a checkpoints directory"):
        checkpoint.manager(str(workdir))
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"checkpoints is a file"):
        train.run(tiny_config("pretrain", **{"train.steps": 2}), str(workdir))
    assert time.monotonic() - t0 < 60  # no wait on a key timeout
    assert not os.path.exists(workdir / "metrics.jsonl") or not (workdir / "metrics.jsonl").read_text()


def _state():
    opt = optim.make_optimizer(defaults.base_config("pretrain").optim, 10)
    params = jax.tree.map(lambda s: np.full(s.shape, 0.01, s.dtype), model.param_shapes(CHECKPOINT_CFG))
    return state.create(params, opt, ema=False)


def test_full_disk_is_one_clear_line_and_earlier_checkpoint_intact(tmp_path, monkeypatch):
    workdir = str(tmp_path)
    st = _state()
    meta = checkpoint.meta_for(CHECKPOINT_CFG, "pretrain")
    mngr = checkpoint.manager(workdir)
    checkpoint.save(mngr, st.replace(step=st.step + 1), data_state={"consumed": 1}, meta=meta)
    mngr.wait_until_finished()

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(workdir, "checkpoints", "2"))

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(store.DiskFull) as e:
        checkpoint.save(mngr, st.replace(step=st.step + 2), data_state={"consumed": 2}, meta=meta)
    msg = str(e.value)
    assert "\n" not in msg and e.value.errno == errno.ENOSPC
    assert f"disk of {workdir} (" in msg and "free" in msg and "left as they were" in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__

    # the async commit failing (orbax wraps the thread's error) surfaces in wait_until_finished the same way
    def commit_failed(self):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("finalize thread failed") from inner

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", commit_failed)
    with pytest.raises(store.DiskFull, match="no space left"):
        mngr.wait_until_finished()
    monkeypatch.undo()
    assert mngr.all_steps() == [1]
    restored, data_state = checkpoint.restore(checkpoint.manager(workdir), st)
    assert int(restored.step) == 1 and data_state == {"consumed": 1}
