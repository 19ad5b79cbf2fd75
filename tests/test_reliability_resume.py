"""A resume compares what it resumes: a changed lr, a swapped data file, a moved-on upstream checkpoint or one
retrained in place to the same step is refused naming each key (``train.resume_changes`` allows a
deliberate change); a longer ``train.steps`` resumes; a checkpoint that records no identity (an older
workdir) resumes with a warning."""

import logging
import os
import re
import shutil

import pytest
from helpers import logged, tiny_config

from gptjax import checkpoint, train
from gptjax.train import defaults, loop, provenance

TINY = {
    "model.d_model": 32,
    "model.n_heads": 2,
    "model.n_layers": 1,
    "train.seq_len": 32,
    "train.log_every": 1,
    "train.steps": 2,
    "train.checkpoint_every": 2,
}
DOCS = "\n\n".join(f"document {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(40))


def config(data_file, **over):
    c = tiny_config("pretrain", **{**TINY, **over})
    c.data = defaults.own_data("pretrain", data_file)
    return c


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 2-step pretraining workdir on a text file: (workdir, data file); tests copy it."""
    root = tmp_path_factory.mktemp("base")
    data_file = str(root / "docs.txt")
    with open(data_file, "w") as f:
        f.write(DOCS)
    workdir = str(root / "run")
    train.run(config(data_file), workdir)
    return workdir, data_file


def copy(base, tmp_path):
    """A copy of the base workdir, reading the base's data file (its path is part of what is compared)."""
    workdir, data_file = base
    shutil.copytree(workdir, tmp_path / "run")
    return str(tmp_path / "run"), data_file


def test_a_changed_lr_is_refused_naming_it_and_the_override_accepts_it(base, tmp_path):
    workdir, data_file = copy(base, tmp_path)
    with pytest.raises(provenance.ResumeMismatch) as e:
        train.run(config(data_file, **{"train.steps": 3, "optim.lr": 1e-3}), workdir)
    lines = str(e.value).splitlines()
    assert "  optim.lr: checkpoint 0.002, now 0.001" in lines
    assert sum(line.startswith("  ") for line in lines) == 1  # only the lr: train.steps is harmless
    assert "--config.train.resume_changes=optim.lr" in str(e.value) and "new workdir" in str(e.value)
    assert [r["step"] for r in logged(workdir)] == [1, 2]  # nothing trained

    train.run(
        config(data_file, **{"train.steps": 3, "optim.lr": 1e-3, "train.resume_changes": "optim.lr"}), workdir
    )
    assert [r["step"] for r in logged(workdir)] == [1, 2, 3]


def test_a_swapped_data_file_is_refused(base, tmp_path):
    workdir, data_file = copy(base, tmp_path)
    with open(data_file, "w") as f:  # the same path, other records
        f.write(DOCS[::-1])
    try:
        with pytest.raises(provenance.ResumeMismatch) as e:
            train.run(config(data_file, **{"train.steps": 3}), workdir)
    finally:
        with open(data_file, "w") as f:
            f.write(DOCS)
    (line,) = [line for line in str(e.value).splitlines() if line.startswith("  ")]
    assert line.startswith("  data.sources.main.path@files: checkpoint 1 file(s), ")
    assert "--config.train.resume_changes=data.sources.main.path" in str(e.value)


def test_a_longer_run_resumes_and_a_stage_started_from_it_sees_its_upstream_move_on(base, tmp_path):
    workdir, data_file = copy(base, tmp_path)
    sft = tiny_config("sft", **{"train.init_from": workdir})
    started = provenance.identity(sft)
    assert re.fullmatch(
        rf"{re.escape(workdir)}@2 checksums [0-9a-f]{{16}}", started["train.init_from@checkpoint"]
    )

    train.run(config(data_file, **{"train.steps": 3}), workdir)  # train.steps is harmless
    assert [r["step"] for r in logged(workdir)] == [1, 2, 3]

    with pytest.raises(provenance.ResumeMismatch) as e:
        provenance.check({"identity": started}, provenance.identity(sft), "", "sft", 2)
    w = re.escape(workdir)
    line = rf"  train.init_from@checkpoint: checkpoint {w}@2 checksums \w+, now {w}@3 checksums \w+\n"
    assert re.search(line, str(e.value))
    assert "--config.train.resume_changes=train.init_from" in str(e.value)
    provenance.check({"identity": started}, provenance.identity(sft), "train.init_from", "sft", 2)


def test_a_checkpoint_without_identity_resumes_with_a_warning(tmp_path, monkeypatch, caplog):
    data_file = str(tmp_path / "docs.txt")
    with open(data_file, "w") as f:
        f.write(DOCS)
    workdir = str(tmp_path / "run")
    meta_for = loop.checkpoint.meta_for

    def old_meta_for(*args, identity=None, **kw):  # what versions before the identity wrote
        return meta_for(*args, **kw)

    monkeypatch.setattr(loop.checkpoint, "meta_for", old_meta_for)
    train.run(config(data_file), workdir)
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING):
        train.run(config(data_file, **{"train.steps": 3, "optim.lr": 1e-3}), workdir)
    assert "records no run identity" in caplog.text
    assert [r["step"] for r in logged(workdir)] == [1, 2, 3]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))


def test_an_upstream_retrained_in_place_to_the_same_step_is_refused(base, tmp_path):
    """The upstream's path and step are unchanged; the checksums its step recorded tell the two apart."""
    upstream, data_file = copy(base, tmp_path)
    down = str(tmp_path / "down")
    train.run(config(data_file, **{"train.init_from": upstream}), down)
    recorded = checkpoint.load_meta(down)[1]["identity"]["train.init_from@checkpoint"]
    assert recorded.startswith(f"{upstream}@2 checksums ")

    shutil.rmtree(upstream)  # retrained into the same directory, to the same step, with another seed and lr
    train.run(config(data_file, **{"train.seed": 7, "optim.lr": 1e-3}), upstream)
    assert checkpoint.manager(upstream, create=False).all_steps() == [2]
    longer = config(data_file, **{"train.init_from": upstream, "train.steps": 3})
    with pytest.raises(provenance.ResumeMismatch) as e:
        train.run(longer, down)
    (line,) = [line for line in str(e.value).splitlines() if line.startswith("  ")]
    now = provenance.upstream(upstream)
    assert line == f"  train.init_from@checkpoint: checkpoint {recorded}, now {now}" and now != recorded
    assert now.startswith(f"{upstream}@2 checksums ")
    assert "--config.train.resume_changes=train.init_from" in str(e.value)
    assert [r["step"] for r in logged(down)] == [1, 2]  # nothing trained

    longer.train.resume_changes = "train.init_from"  # a deliberate change
    train.run(longer, down)
    assert [r["step"] for r in logged(down)] == [1, 2, 3]


def test_an_upstream_recorded_without_checksums_compares_by_path_and_step():
    """A workdir written before upstream checksums were recorded resumes; a moved-on step is still refused."""
    key = "train.init_from@checkpoint"
    old, now = {key: "/runs/sft@4"}, {key: "/runs/sft@4 checksums 0123456789abcdef"}
    assert provenance.differences(old, now) == ([], [])
    moved = {key: "/runs/sft@5 checksums 0123456789abcdef"}
    assert provenance.differences(old, moved)[0] == [f"{key}: checkpoint /runs/sft@4, now {moved[key]}"]
    other = {key: "/runs/sft@4 checksums fedcba9876543210"}
    assert provenance.differences(now, other)[0] == [f"{key}: checkpoint {now[key]}, now {other[key]}"]
