"""Sweeps as code: a config's grid runs end to end into a table, resumes finished points, and aggregates
seeds."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers import ROOT, SMALL_CONFIG, script_env
from helpers import TINY_CONFIG as TINY

from gptjax import checkpoint, model
from gptjax.research import sweep
from gptjax.train import defaults


def run_sweep(base, workdir, *extra):
    env = script_env()  # one device
    args = [
        "--config",
        SMALL_CONFIG,
        "--sweep",
        "smoke",
        "--base",
        base,
        "--workdir",
        workdir,
        "--eval_prompts",
        "8",
        "--eval_samples",
        "1",
    ]
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "sweep.py"), *args, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_a_two_point_sweep_writes_its_table_and_resumes(small_base, tmp_path):
    """configs/tiny.py's smoke sweep, run on the tests' small model (tests/small_config.py)."""
    base = small_base
    done = run_sweep(base, str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    root = tmp_path / "smoke"
    report = (root / "report.md").read_text()
    for label in ("kl_coef=0.0", "kl_coef=0.1"):
        for policy in ("policy", "ema"):  # the tiny PPO keeps an EMA policy: both evaluated
            assert f"| {label} | {policy} | 1 |" in report
    assert (root / "smoke.png").stat().st_size > 0
    rows = json.loads((root / "results.json").read_text())["rows"]
    assert len(rows) == 4 and all(r["gold"] is not None and 0.0 <= r["gold"] <= 1.0 for r in rows)
    runs = json.loads((root / "results.json").read_text())["runs"]
    assert [r["overrides"]["rollout.kl_coef"] for r in runs] == [0.0, 0.1]
    assert all(r["overrides"]["train.steps"] == 4 for r in runs)
    # the run trained the point's steps with the point's settings
    point = root / "kl_coef=0.1-seed0"
    assert checkpoint.load_meta(str(point))[0] == 4
    # a second invocation trains nothing: every point's results are kept
    stamps = {
        p: os.path.getmtime(root / p / "results.json") for p in ("kl_coef=0.0-seed0", "kl_coef=0.1-seed0")
    }
    again = run_sweep(base, str(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "=== stage" not in again.stderr and "resuming" not in again.stderr
    assert {p: os.path.getmtime(root / p / "results.json") for p in stamps} == stamps
    assert (root / "report.md").read_text().split("\n")[4:] == report.split("\n")[4:]  # same table

    # a metric asked for after the points finished (held-out text loss, the PPO-ptx sweep's) is added from
    # their checkpoints, without training them again
    evaluator = sweep.Evaluator(SMALL_CONFIG, base, eval_prompts=8, samples=1, text_loss=True)
    point = sweep.load_sweep(SMALL_CONFIG, "smoke").points[1]
    ckpt = os.path.getmtime(root / point.name / "checkpoints")
    out = sweep.run_point(SMALL_CONFIG, point, base, str(root), evaluator)
    saved = json.loads((root / point.name / "results.json").read_text())["results"]
    for policy in ("policy", "ema"):
        loss = out["results"][policy]["text_loss"]
        assert saved[policy]["text_loss"] == loss and 0.0 < loss < 2 * math.log(259)
    assert os.path.getmtime(root / point.name / "checkpoints") == ckpt
    sft = evaluator.sft_result(str(root / "sft_eval.json"))
    assert json.loads((root / "sft_eval.json").read_text())["text_loss"] == sft["text_loss"]
    rows = sweep.summarise([out])
    lines = "\n".join(sweep.report_lines("smoke", sweep.Sweep(()), rows, sft, "cmd", 1.0))
    assert "| held-out text loss |" in lines and "held-out text loss " in lines.split("\n")[4]


def test_text_loss_of_a_uniform_model_is_log_vocab():
    """Zero weights give uniform next-token probabilities: the loss is log V per token, whatever the text."""
    from gptjax.evals import evaluate

    c = defaults.load_config(f"{SMALL_CONFIG}:stage=pretrain")
    cfg = model.config_from_dict(c.model.to_dict())
    zeros = jax.tree.map(jnp.zeros_like, model.init(cfg, jax.random.key(0)))
    got = evaluate.text_loss(cfg, zeros, c.data, seq_len=c.train.seq_len, batches=2)
    assert got["text_loss"] == pytest.approx(math.log(cfg.vocab_size), rel=1e-5)
    assert got["text_tokens"] > 1000  # real validation text, padding and document ends not counted
    # a random model: the weighted next-token loss over the first 2 validation batches, computed directly
    from gptjax import data
    from gptjax.losses import lm

    params = model.init(cfg, jax.random.key(3))
    it = data.make_iterator(
        c.data, stage="pretrain", batch_size=32, seq_len=c.train.seq_len, seed=0, split="validation"
    )
    total = count = 0.0
    for _ in range(2):
        b = next(it)
        logits = model.apply(cfg, params, b["inputs_BL"], b["positions_BL"], b["segment_ids_BL"])
        logp = lm.token_logprobs(logits, b["targets_BL"])
        total, count = total - float(jnp.sum(logp * b["weights_BL"])), count + float(b["weights_BL"].sum())
    want = evaluate.text_loss(cfg, params, c.data, seq_len=c.train.seq_len, batches=2)
    assert want["text_tokens"] == count and want["text_loss"] == pytest.approx(total / count, rel=1e-4)
    assert abs(want["text_loss"] - math.log(cfg.vocab_size)) > 1e-3
    # every model is measured on the same batches
    other = evaluate.text_loss(
        cfg, model.init(cfg, jax.random.key(0)), c.data, seq_len=c.train.seq_len, batches=2
    )
    assert other["text_tokens"] == got["text_tokens"] and other["text_loss"] != got["text_loss"]


def test_seeds_are_averaged_with_their_standard_error():
    def run(label, seed, gold, diff):
        r = {"gold_reward_mean": gold, "gold_reward_se": 0.05, "gold_vs_sft": diff, "gold_vs_sft_se": 0.02}
        return {
            "label": label,
            "seed": seed,
            "x": 1.0,
            "wall_s": 10.0,
            "results": {"policy": {**r, "kl_to_ref": 0.5}},
        }

    rows = sweep.summarise([run("a", 0, 0.5, 0.1), run("a", 1, 0.7, 0.3), run("b", 0, 0.4, 0.0)])
    a, b = rows
    assert (a["label"], a["seeds"]) == ("a", 2) and (b["label"], b["seeds"]) == ("b", 1)
    assert a["gold"] == pytest.approx(0.6) and a["gold_se"] == pytest.approx(0.1)  # std 0.1414 / sqrt 2
    assert a["gold_vs_sft"] == pytest.approx(0.2) and a["gold_vs_sft_se"] == pytest.approx(0.1)
    assert b["gold_se"] == 0.05 and b["gold_vs_sft_se"] == 0.02  # one seed: the over-prompts errors
    assert a["wall_s"] == 20.0


def test_point_overrides_name_unknown_keys():
    p = sweep.Point("x", overrides=(("rollout.kl_coeff", 0.1),))
    with pytest.raises(ValueError, match="no key 'rollout.kl_coeff'"):
        sweep.point_config(TINY, p, "runs/base")
    c = sweep.point_config(TINY, sweep.Point("y", overrides=(("rollout.kl_coef", 1),), seed=2), "runs/base")
    assert c.rollout.kl_coef == 1.0 and c.train.seed == 2
    assert c.roles.policy.init_from == os.path.join("runs/base", "sft")
    assert c.frozen.reward.init_from == os.path.join("runs/base", "rm")
    with pytest.raises(ValueError, match="declares no sweep 'nope'"):
        sweep.load_sweep(TINY, "nope")
    assert defaults.load_config(f"{TINY}:stage=ppo").rollout.kl_coef == 0.1  # the file itself unchanged
