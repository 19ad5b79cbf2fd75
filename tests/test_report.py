"""Reports from metrics files: the moving average behind the smoothed curves, each stage's training figure,
the RL figure (smoothed per-rollout curves, the SFT baseline, the final policy and its EMA held out, the run's
own evaluations) and scripts/pipeline.py's report built from fake stage workdirs (no training)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, script_env

from gptjax.research import report

PNG = b"\x89PNG\r\n\x1a\n"


def write_metrics(workdir, rows):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(workdir)


def fake_runs(root):
    """Stage workdirs with the rows train.run logs: train / eval rows, PPO's rollout rows and an evaluator
    of the EMA policy (split 'eval/gold_ema')."""
    r = np.random.default_rng(0)
    lm = [{"step": s, "split": "train", "loss": 5.0 / s + 0.1 * r.random()} for s in range(1, 41)]
    lm += [{"step": s, "split": "eval", "loss": 5.0 / s} for s in (20, 40)]
    rm = [
        {"step": s, "split": "train", "loss": 0.69 - s / 100, "accuracy": 0.5 + s / 100} for s in range(1, 21)
    ]
    ppo = []
    for s in range(4, 124, 4):
        ppo.append(
            {"step": s, "split": "rollout", "reward": s / 100, "kl": s / 200, "gold_reward": 0.5 + s / 1e3}
        )
        ppo.append({"step": s, "split": "train", "loss": 0.1, "policy_loss": -0.01, "value_loss": 0.3})
    ppo += [
        {"step": s, "split": "eval/gold_ema", "gold_reward_mean": 0.52, "kl_to_ref": 0.1} for s in (60, 120)
    ]
    return {
        "pretrain": write_metrics(root / "pretrain", lm),
        "sft": write_metrics(root / "sft", lm),
        "rm": write_metrics(root / "rm", rm),
        "ppo": write_metrics(root / "ppo", ppo),
    }


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


def test_ema_is_debiased_and_smooths():
    assert report.ema([2.0, 2.0, 2.0], span=9) == pytest.approx([2.0, 2.0, 2.0])  # no pull towards 0
    np.testing.assert_allclose(report.ema([1.0, 0.0], span=3), [1.0, 1 / 3])  # alpha 0.5, debiased
    noisy = np.random.default_rng(1).normal(0.0, 1.0, 400)
    smooth = np.array(report.ema(noisy, span=20))
    assert smooth[50:].std() < 0.35 * noisy.std()
    step = report.ema([0.0] * 20 + [1.0] * 60, span=5)
    assert step[19] == 0.0 and step[-1] == pytest.approx(1.0, abs=1e-6)
    assert report.default_span(3) == 1.0 and report.default_span(30) == 6.0 and report.default_span(400) == 80


def test_each_stage_gets_a_small_loss_figure(tmp_path):
    runs = fake_runs(tmp_path)
    drawn = report.plot_stage(runs["pretrain"], str(tmp_path / "p.png"), "pretrain")
    assert drawn == {"pretrain: loss": ["train (EMA, span 8)", "validation"]}
    assert is_png(tmp_path / "p.png")
    drawn = report.plot_stage(runs["rm"], str(tmp_path / "rm.png"), "rm", ("loss", "accuracy"))
    assert list(drawn) == ["rm: loss", "rm: accuracy"]
    drawn = report.plot_stage(runs["ppo"], str(tmp_path / "ppo.png"), "ppo")  # RL: policy and value loss
    assert list(drawn) == ["ppo: policy loss", "ppo: value loss"]
    empty = write_metrics(tmp_path / "empty", [{"step": 1, "split": "rollout", "reward": 0.0}])
    assert report.plot_stage(empty, str(tmp_path / "e.png"), "empty") == {}
    assert not (tmp_path / "e.png").exists()


def test_rollout_figure_smooths_and_shows_the_baseline_and_the_ema_policy(tmp_path):
    runs = fake_runs(tmp_path)
    path = str(tmp_path / "rollouts.png")
    drawn = report.plot_rollouts(
        runs["ppo"],
        path,
        baselines={"gold_reward": ("SFT, held out", 0.48), "kl": ("SFT (the reference)", 0.0)},
        marks={"gold_reward": {"PPO, held out": (120, 0.53, 0.02), "PPO EMA, held out": (120, 0.52, 0.02)}},
    )
    assert is_png(path)
    assert drawn["gold reward"] == [
        "per rollout (EMA, span 6)",
        "gold_ema",  # the run's own evaluator of the EMA policy, as markers
        "SFT, held out",
        "PPO, held out",
        "PPO EMA, held out",
    ]
    assert drawn["KL to the reference (per response)"] == [
        "per rollout (EMA, span 6)",
        "gold_ema",
        "SFT (the reference)",
    ]
    assert drawn["reward-model reward"] == ["per rollout (EMA, span 6)"]


def test_pipeline_report_from_metrics_files(tmp_path):
    runs = fake_runs(tmp_path)
    sampled = {"gold_reward_mean": 0.48, "gold_reward_se": 0.02, "rm_reward_mean": 0.01, "kl_to_ref": 0.0}
    ppo = {"gold_reward_mean": 0.53, "gold_reward_se": 0.02, "rm_reward_mean": 0.2, "kl_to_ref": 0.6}
    results = {
        "pretrain": {"final_train_loss": 1.3},
        "sft": {"final_train_loss": 1.1, "greedy_gold_reward": 0.68},
        "rm": {
            "final_train_loss": 0.5,
            "pairwise_accuracy": 0.7,
            "gold_agreement": 0.8,
            "reward_mean": 0.0,
            "reward_std": 1.0,
            "demo_reward_mean": 0.0,
            "pairs": 600,
        },
        "ppo": {
            **ppo,
            "final_train_loss": -0.01,
            "compared": {"sft": sampled, "ppo_ema": {**ppo, "gold_reward_mean": 0.52, "kl_to_ref": 0.16}},
        },
    }
    (tmp_path / "results.in.json").write_text(json.dumps(results))
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {os.path.join(ROOT, 'scripts')!r})\n"
        "import pipeline\n"
        "from absl import flags\n"
        f"flags.FLAGS(['pipeline.py', '--workdir={tmp_path}'])\n"
        f"pipeline.write_report(json.load(open({str(tmp_path / 'results.in.json')!r})))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=script_env(), cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "report.md").read_text()
    figures = [line for line in text.splitlines() if line.startswith("![")]
    assert figures == [
        "![PPO per rollout](ppo.png)",
        "![pretrain training](pretrain_loss.png)",
        "![sft training](sft_loss.png)",
        "![rm training](rm_loss.png)",
        "![ppo training](ppo_loss.png)",
    ]
    for name in ("ppo.png", "pretrain_loss.png", "sft_loss.png", "rm_loss.png", "ppo_loss.png"):
        assert is_png(tmp_path / name), name
    assert "| ppo_ema | 0.520 +- 0.020 |" in text
    assert json.loads((tmp_path / "results.json").read_text())["stages"]["ppo_ema"]["kl_to_ref"] == 0.16
    assert runs["ppo"] == str(tmp_path / "ppo")
