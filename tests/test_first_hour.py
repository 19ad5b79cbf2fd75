"""What a new user meets first: one-line config errors (the traceback behind --verbose), TensorFlow's native
noise filtered, chat and generate defaults that fit a small model's context, generate's vocabulary names, the
warning for a stage started from random weights, and Weights & Biases logging (offline)."""

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import ROOT, TINY_CONFIG, logged, save_workdir, script_env, tiny_config

from gptjax import model
from gptjax.train import build, console, defaults, roles, stages

# max_len 48: chat's old default of 128 new tokens did not fit it at all, generate's 64 not with a prompt
LM = model.ModelConfig.gpt2(vocab_size=288, d_model=32, n_layers=1, n_heads=2, max_len=48)


def run_script(script, *args, stdin=None):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=script_env(),
        input=stdin,
        timeout=300,
    )


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
    """A small SFT workdir saved directly (random weights; the scripts need no trained model)."""
    config = defaults.load_config(f"{TINY_CONFIG}:stage=sft")
    rs = np.random.RandomState(0)
    params = jax.tree.map(lambda s: rs.normal(0, 0.3, s.shape).astype(s.dtype), model.param_shapes(LM))
    path = tmp_path_factory.mktemp("first_hour") / "sft"
    return save_workdir(path, "sft", params, LM, step=1, config=config.to_json_best_effort())


def test_config_errors_are_a_line_naming_the_fix_and_verbose_shows_the_traceback(tmp_path):
    base = ["--config", "configs/tiny.py:stage=pretrain", "--workdir", str(tmp_path / "run")]
    typo = run_script("train.py", *base, "--config.train.stpes=3")
    assert typo.returncode == 1
    lines = error_lines(typo)
    assert len(lines) <= 2 and "Traceback" not in typo.stderr, typo.stderr
    assert lines[0].startswith("train.py: error: --config.train.stpes:") and "train.steps" in lines[0]

    bad = run_script("train.py", *base, "--config.train.steps=0")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr
    assert error_lines(bad) == [
        "train.py: error: invalid config:",
        "  train.steps=0 must be > 0",
        error_lines(bad)[-1],
    ]
    assert "raised at gptjax/train/build.py" in error_lines(bad)[-1]
    assert "--verbose" in error_lines(bad)[-1]
    assert not (tmp_path / "run").exists()

    verbose = run_script("train.py", *base, "--config.train.steps=0", "--verbose")
    assert verbose.returncode == 1
    assert "Traceback (most recent call last)" in verbose.stderr
    assert "ValueError: invalid config:" in verbose.stderr


def test_config_key_error_names_close_keys_or_the_section():
    spec = f"{TINY_CONFIG}:stage=pretrain"
    message = console.config_key_error(["--config", spec, "--config.trian.steps=3"])
    assert message.startswith("--config.trian.steps: ") and "no key trian; did you mean train?" in message
    message = console.config_key_error([f"--config={spec}", "--config.optim.zzz=1"])
    assert "no key optim.zzz; the keys of optim: b1, b2, clip_norm," in message
    message = console.config_key_error([f"--config={spec}", "--config.train.lr=1"])
    assert message.endswith("has no key train.lr; did you mean optim.lr?")
    assert console.config_key_error([f"--config={spec}", "--config.train.steps=3"]) is None


def test_native_noise_is_dropped_and_every_other_line_kept(capfd):
    noise = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796572865.108348   12540 port.cc:153] oneDNN custom operations are on.",
        "I0000 00:00:1796572865.109021   12540 cudart_stub.cc:31] Could not find cuda drivers",
        "E0000 00:00:1796572868.506037   12540 cuda_platform.cc:52] failed call to cuInit: INTERNAL",
    ]
    kept = [
        "E0000 00:00:1796572868.506037   12540 file_io.cc:12] could not open data.tfrecord",
        "a plain line",
    ]
    with console.native_stderr_filtered():
        os.write(2, "".join(line + "\n" for line in noise + kept).encode())
    assert capfd.readouterr().err.splitlines() == kept


def test_tensorflow_loads_without_native_noise():
    code = (
        "import sys; sys.argv = ['x']\n"
        "from gptjax.train import console; console.quiet_native()\n"
        "from gptjax.data import sources; sources.import_tf()\n"
        "import tensorflow as tf; print(int(tf.constant(2) + 1))\n"
    )
    env = {k: v for k, v in script_env().items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell has it
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "3"
    assert proc.stderr.strip() == "", proc.stderr


def test_chat_and_generate_defaults_fit_a_small_context(sft_workdir):
    chat = run_script("chat.py", "--checkpoint", sft_workdir, "--prompt", "2+2?", "--temperature=0")
    assert chat.returncode == 0, chat.stderr
    assert len(chat.stdout.splitlines()) >= 1
    assert "Traceback" not in chat.stderr

    long = "x" * 60  # fills the 48-token context: one line naming the prompt and the fix
    gen = run_script(
        "generate.py", "--checkpoint", sft_workdir, "--prompt", "hi", "--vocab", "bytes", "--temperature=0"
    )
    assert gen.returncode == 0, gen.stderr
    # BOS + 'hi': the default takes what the context leaves (45 tokens), not 64
    assert gen.stdout.startswith("--- prompt 0 sample 0")
    assert not [line for line in gen.stderr.splitlines() if " orbax" in line or "pytree_checkpoint" in line]

    full = run_script("generate.py", "--checkpoint", sft_workdir, "--prompt", long)
    assert full.returncode == 1
    assert error_lines(full) == [
        "generate.py: error: prompt 0 is 61 tokens: it leaves no room for a completion in the model's "
        "context of 48 tokens: shorten it"
    ]


def test_generate_takes_the_vocabulary_names_its_help_gives(sft_workdir):
    proc = run_script("generate.py", "--checkpoint", sft_workdir, "--prompt", "hi", "--vocab", "wordpiece")
    assert proc.returncode == 1
    lines = error_lines(proc)
    assert lines[0] == (
        "generate.py: error: flag --vocab=wordpiece: value should be one of <bytes|byte|sentencepiece|hf>"
    )
    assert len(lines) == 2 and "Traceback" not in proc.stderr


def test_a_stage_without_a_starting_model_warns(caplog):
    sft = tiny_config("sft")
    with caplog.at_level(logging.WARNING):
        lines = build.random_init_warnings(sft, roles.trained_roles(sft, stages.of_config(sft)))
    assert lines == [
        "stage 'sft' trains role 'model' from random weights: train.init_from is empty. This stage starts "
        "from an earlier one: set --config.train.init_from=<its workdir or a Hugging Face directory>"
    ]
    assert lines[0] in caplog.text
    started = [roles.Role("model", LM, init_from="runs/tiny/pretrain")]
    assert build.random_init_warnings(sft, started) == []
    pretrain = tiny_config("pretrain")
    assert (
        build.random_init_warnings(pretrain, roles.trained_roles(pretrain, stages.of_config(pretrain))) == []
    )
    ppo = tiny_config("ppo")
    critic = [roles.Role("policy", LM, init_from="runs/tiny/sft"), roles.Role("value", LM)]
    (line,) = build.random_init_warnings(ppo, critic)
    assert "role 'value'" in line and "--config.roles.value.init_from=" in line


def test_wandb_logs_beside_tensorboard_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")  # the 'wandb' extra: skipped only where it is not installed
    from gptjax import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen = {}
    init = wandb.init

    def recording_init(*args, **kwargs):
        run = init(*args, **kwargs)
        finish = run.finish

        def finish_and_record(*a, **k):  # what W&B holds for the run, read before it closes
            seen.update(summary=dict(run.summary), config=dict(run.config), dir=run.dir)
            return finish(*a, **k)

        run.finish = finish_and_record
        return run

    monkeypatch.setattr(wandb, "init", recording_init)
    c = tiny_config("pretrain", **{"model.d_model": 32, "model.n_heads": 2, "model.n_layers": 1})
    c.train.update(steps=2, seq_len=32, log_every=1)
    with c.unlocked():  # until config.train declares wandb_project ('' = off)
        c.train.wandb_project = "gptjax-test"
    workdir = str(tmp_path / "run")
    train.run(c, workdir)
    summary = seen["summary"]
    rows = logged(workdir)
    assert summary["step"] == 2
    assert {f"train/{k}" for k in rows[-1] if k not in ("step", "split")} <= set(summary)
    assert summary["train/loss"] == pytest.approx(rows[-1]["loss"])
    assert seen["config"]["train"]["steps"] == 2
    assert seen["dir"].startswith(os.path.join(workdir, "wandb"))  # written under the workdir: no network
    with open(os.path.join(workdir, "wandb_run_id")) as f:
        assert f.read().strip() in seen["dir"]  # a resume continues this W&B run
    assert json.loads(open(os.path.join(workdir, "metrics.jsonl")).readline())["split"] == "train"
