"""End to end on the tiny config: pretrain -> SFT from its checkpoint -> reward model and DPO, kill and
resume, config errors, the size presets shrunk, the RM preset from a Hugging Face directory, the demo
pipeline rerun on a finished workdir."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import PRETRAIN_STEPS, ROOT, SMALL_CONFIG, logged, random_params, save_workdir, tiny_config
from ml_collections import FrozenConfigDict

from gptjax import checkpoint, model, train
from gptjax.data import get_vocabulary, tiny
from gptjax.rl import reward
from gptjax.train import defaults, step


def tensorboard_steps(logdir, tag):
    """Steps of ``tag`` as TensorBoard shows them: event files in order, each SessionLog START at step s
    dropping what came before at steps >= s."""
    from tensorboardX.proto import event_pb2

    kept = []
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):  # TFRecord framing: u64 length, u32 crc, payload, u32 crc
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
            pos += 16 + n
            if event.session_log.status == event_pb2.SessionLog.START:
                kept = [step for step in kept if step < event.step]
            kept += [event.step for v in event.summary.value if v.tag == tag]
    return kept


def test_pretrain_then_sft_from_checkpoint(pretrained, sft):
    rows = logged(pretrained)
    assert [r["step"] for r in rows] == list(range(5, PRETRAIN_STEPS + 1, 5))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert logged(pretrained, "eval")[-1]["step"] == PRETRAIN_STEPS
    assert all(r["tokens_per_s"] > 0 for r in rows)

    sft_rows = logged(sft)
    assert sft_rows[-1]["loss"] < sft_rows[0]["loss"]
    # started from the pretrained weights, not from scratch: far below uniform over 259 byte ids (5.56)
    assert sft_rows[0]["loss"] < 4.0


def test_kill_and_rerun_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    # A constant learning rate keeps the total steps out of the compiled train step, so the killed run and
    # the resumed one below run the same program (the second reads it from the compilation cache).
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts", "train.py"),
        "--config",
        SMALL_CONFIG + ":stage=pretrain",
        "--workdir",
        workdir,
        "--config.train.steps=400",
        "--config.train.checkpoint_every=10",
        "--config.optim.schedule=constant",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = os.path.join(workdir, "checkpoints", "10")
    deadline = time.time() + 300
    while not os.path.isdir(ckpt) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(ckpt), "the first run never wrote a checkpoint"
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert saved[-1] < 400

    # the same command again (in-process here) continues from the last checkpoint to the end
    c = tiny_config(
        "pretrain",
        **{"train.steps": saved[-1] + 10, "train.checkpoint_every": 10, "optim.schedule": "constant"},
    )
    train.run(c, workdir)
    # every step logged once: rows the killed run wrote after its last checkpoint are replaced, not repeated
    assert [r["step"] for r in logged(workdir)] == list(range(5, saved[-1] + 11, 5))
    # and TensorBoard (which drops earlier events at or after a restart's purge step) shows each step once
    shown = tensorboard_steps(os.path.join(workdir, "tb"), "train/loss")
    assert shown == list(range(5, saved[-1] + 11, 5))
    assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())[-1] == (
        saved[-1] + 10
    )


def test_unknown_config_key_names_the_key(tmp_path):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts", "train.py"),
        "--config",
        os.path.join(ROOT, "configs", "tiny.py") + ":stage=pretrain",
        "--workdir",
        str(tmp_path),
        "--config.train.stepz=5",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "stepz" in out.stderr


def test_bad_config_values_are_reported():
    c = tiny_config("pretrain", **{"train.batch_size": 6, "train.micro_batches": 4})
    with pytest.raises(ValueError, match="batch_size=6"):
        train.run(c, "/nonexistent-never-created")
    with pytest.raises(ValueError, match="stage"):
        tiny_config("ppo-typo")


@pytest.mark.parametrize("name", ["gpt2_124m", "llama_1b"])
def test_size_presets_run_end_to_end_when_shrunk(tmp_path, name):
    """Each accelerator config builds and trains a few steps on CPU with its model shrunk."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(f"document {i}: " + "the quick brown fox " * (i % 7 + 1) for i in range(60))
    )
    c = defaults.load_config(os.path.join(ROOT, "configs", f"{name}.py") + f":stage=pretrain,data={corpus}")
    assert c.model.dtype == "bfloat16" and c.model.param_dtype == "float32"
    c.model.update(d_model=32, n_layers=1, n_heads=2, d_ff=64, vocab_size=288)
    if c.model.n_kv_heads:
        c.model.n_kv_heads = 1
    c.train.update(
        steps=3, batch_size=8, micro_batches=1, seq_len=32, log_every=1, eval_every=0, checkpoint_every=3
    )
    c.optim.warmup_steps = 1
    last = train.run(c, str(tmp_path / "run"))
    assert np.isfinite(last["loss"]) and last["loss"] > 0


def test_lora_sft_trains_and_stores_only_adapters(tmp_path, pretrained):
    lora = str(tmp_path / "lora")
    c = tiny_config("sft", **{"train.steps": 10, "train.init_from": pretrained, "optim.lr": 1e-2})
    c.model.update(lora_rank=4, lora_targets=("wq", "wv", "w_in"))
    train.run(c, lora)
    rows = logged(lora)
    assert rows[-1]["loss"] < rows[0]["loss"]
    _, meta = checkpoint.load_meta(lora)
    assert meta["model"]["lora_rank"] == 4
    saved = checkpoint.store._saved_param_shapes(checkpoint.manager(lora, create=False), 10)
    assert saved and all(name.endswith(("_lora_a", "_lora_b")) for name in saved), sorted(saved)
    # load_model puts the adapters back on the frozen base named by the run's init_from
    base_cfg, base = checkpoint.load_model(pretrained)
    cfg, params = checkpoint.load_model(lora)
    assert cfg.lora_rank == 4 and base_cfg.lora_rank == 0
    np.testing.assert_array_equal(params["embed"], base["embed"])
    assert params["blocks"]["mlp"]["w_in_lora_b"].shape[0] == cfg.n_layers
    assert float(np.abs(params["blocks"]["mlp"]["w_in_lora_b"]).max()) > 0  # trained away from zero init
    # a base of another width (a fresh model saved as a pretraining checkpoint) is refused, naming d_model
    wrong_cfg = model.config_from_dict(c.model).replace(lora_rank=0, d_model=32, n_heads=2)
    save_workdir(tmp_path / "wrong", "pretrain", random_params(wrong_cfg, 0), wrong_cfg)
    with pytest.raises(ValueError, match="d_model"):
        checkpoint.load_model(lora, base=str(tmp_path / "wrong"))


def test_sft_then_reward_model_then_dpo(tmp_path, sft):
    rm, dpo = str(tmp_path / "rm"), str(tmp_path / "dpo")

    c = tiny_config(
        "rm", **{"train.steps": 60, "train.init_from": sft, "optim.lr": 3e-4, "train.eval_every": 60}
    )
    train.run(c, rm)
    cfg, params = checkpoint.load_model(rm)
    assert cfg.head == "scalar"
    vocab = get_vocabulary(c.data)
    ctx = step.Ctx(model_cfg=cfg, loss_cfg=FrozenConfigDict(c.loss))
    held_out = [(r["prompt"], r["responses"]) for r in tiny.records("rank", "validation", c.data.tiny)][:200]
    ev = reward.evaluate_rm(ctx, params, vocab, held_out, c.train.seq_len, tiny.gold_reward)
    assert ev["pairwise_accuracy"] > 0.6, ev  # chance: 0.5, over 1,200 held-out pairs
    assert ev["gold_agreement"] > 0.6, ev
    # Normalised: held-out demonstrations (not the ones the bias was fitted on) score mean 0.
    demos = [(r["prompt"], [r["response"]]) for r in tiny.eval_sft_records(0, 200, noise=0.3)]
    demo_rewards = np.concatenate(reward.score(ctx, params, vocab, demos, c.train.seq_len))
    assert abs(demo_rewards.mean()) < 0.05, demo_rewards.mean()
    assert logged(rm, "finish")[0]["demos"] == 512

    c = tiny_config(
        "dpo",
        **{
            "train.steps": 30,
            "train.init_from": sft,
            "optim.lr": 1e-4,
            "train.eval_every": 30,
            "train.eval_steps": 8,
        },
    )
    train.run(c, dpo)
    margin = logged(dpo, "eval")[-1]["margin"]  # policy == ref at the start: margin 0
    assert margin > 0.05, margin
    assert logged(dpo, "train")[-1]["loss"] < np.log(2.0)


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
    ctx = step.Ctx(model_cfg=cfg, loss_cfg=FrozenConfigDict(c.loss))
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
        f"--config={SMALL_CONFIG}",
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
    steps = [r["step"] for r in logged(str(tmp_path / "pretrain"), "train")]
    assert len(steps) == len(set(steps))  # no step logged twice
