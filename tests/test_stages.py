"""End to end on the tiny task through the one loop: SFT -> reward model -> DPO, the RM preset from a Hugging
Face directory, and the demo pipeline rerun on a finished workdir."""

import json
import os
import subprocess
import sys

import numpy as np

from gptjax import checkpoint, defaults, reward, step, train
from gptjax.data import get_vocabulary, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {
    "model.d_model": 64,
    "model.n_layers": 2,
    "model.n_heads": 4,
    "train.batch_size": 8,
    "train.log_every": 5,
}


def tiny_config(stage, **overrides):
    c = defaults.load_config(os.path.join(ROOT, "configs", "tiny.py") + f":stage={stage}")
    for key, value in {**SMALL, **overrides}.items():
        section, name = key.split(".")
        setattr(c[section], name, value)
    return c


def rows(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def test_sft_then_reward_model_then_dpo(tmp_path):
    pre, sft, rm, dpo = (str(tmp_path / s) for s in ("pretrain", "sft", "rm", "dpo"))
    train.run(tiny_config("pretrain", **{"train.steps": 40, "train.seq_len": 64, "optim.lr": 3e-3}), pre)
    train.run(tiny_config("sft", **{"train.steps": 40, "train.seq_len": 64, "train.init_from": pre}), sft)

    c = tiny_config(
        "rm", **{"train.steps": 60, "train.init_from": sft, "optim.lr": 3e-4, "train.eval_every": 60}
    )
    train.run(c, rm)
    cfg, params = checkpoint.load_model(rm)
    assert cfg.head == "scalar"
    vocab = get_vocabulary(c.data)
    ctx = step.Ctx(model_cfg=cfg, loss_cfg=c.loss)
    held_out = [(r["prompt"], r["responses"]) for r in tiny.records("rank", "validation", c.data.tiny)][:200]
    ev = reward.evaluate_rm(ctx, params, vocab, held_out, c.train.seq_len, tiny.gold_reward)
    assert ev["pairwise_accuracy"] > 0.6, ev  # chance: 0.5, over 1,200 held-out pairs
    assert ev["gold_agreement"] > 0.6, ev
    # Normalised: held-out demonstrations (not the ones the bias was fitted on) score mean 0.
    demos = [(r["prompt"], [r["response"]]) for r in tiny.eval_sft_records(0, 200, noise=0.3)]
    demo_rewards = np.concatenate(reward.score(ctx, params, vocab, demos, c.train.seq_len))
    assert abs(demo_rewards.mean()) < 0.05, demo_rewards.mean()
    assert rows(rm, "finish")[0]["demos"] == 512

    c = tiny_config(
        "dpo", **{"train.steps": 30, "train.init_from": sft, "optim.lr": 1e-4, "train.eval_every": 30}
    )
    train.run(c, dpo)
    margin = rows(dpo, "eval")[-1]["margin"]  # policy == ref at the start: margin 0
    assert margin > 0.05, margin
    assert rows(dpo, "train")[-1]["loss"] < np.log(2.0)


def test_rm_preset_from_a_hugging_face_directory(tmp_path):
    """configs/rm_350m.py, shrunk, from a tiny random OPT saved by transformers: trains and normalises."""
    import transformers

    hf_dir = tmp_path / "opt"
    transformers.OPTForCausalLM(
        transformers.OPTConfig(
            vocab_size=288,
            hidden_size=32,
            num_hidden_layers=1,
            ffn_dim=64,
            num_attention_heads=2,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        )
    ).save_pretrained(hf_dir)
    recs = tiny.rank_records(0, 40, 3, 0.15, 0.3)
    (tmp_path / "rank.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in tiny.sft_records(0, 30)))
    arg = f"init_from={hf_dir},data={tmp_path / 'rank.jsonl'},sft_data={tmp_path / 'sft.jsonl'},rankings=24"
    c = defaults.load_config(os.path.join(ROOT, "configs", "rm_350m.py") + ":" + arg)
    assert c.train.steps == 1  # one epoch of 24 rankings in batches of 64 prompts
    c.model.update(d_model=32, n_layers=1, n_heads=2, d_ff=64, vocab_size=288, max_len=64)
    c.train.update(steps=3, batch_size=16, micro_batches=2, seq_len=48, eval_every=0, checkpoint_every=3)
    c.optim.warmup_steps = 1
    c.normalize.examples = 30
    last = train.run(c, str(tmp_path / "rm"))
    assert np.isfinite(last["loss"])
    cfg, params = checkpoint.load_model(str(tmp_path / "rm"))
    ctx = step.Ctx(model_cfg=cfg, loss_cfg=c.loss)
    vocab = get_vocabulary(c.data)
    demos = reward.demonstrations(c.normalize.data, vocab, 30)
    assert len(demos) == 30
    np.testing.assert_allclose(
        np.concatenate(reward.score(ctx, params, vocab, demos, 48)).mean(), 0.0, atol=1e-4
    )


def test_pipeline_rerun_on_a_finished_workdir_rebuilds_the_report(tmp_path):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts", "pipeline.py"),
        f"--workdir={tmp_path}",
        "--quick",
        "--stages=pretrain",
        "--eval_prompts=8",
        "--steps=5",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    report = tmp_path / "report.md"
    before = report.read_text()
    report.unlink()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "not trained again" in again.stderr
    assert report.read_text() == before
    steps = [r["step"] for r in rows(str(tmp_path / "pretrain"), "train")]
    assert len(steps) == len(set(steps))  # no step logged twice
