"""Chat and generate: stream.stream against sample.generate, load_lm on roles / EMA / scalar heads, and
scripts/chat.py and scripts/generate.py run on tiny workdirs saved directly (no training)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import ROOT, save_workdir

from gptjax import checkpoint, model
from gptjax.model import sample, stream
from gptjax.train import defaults


def random_params(cfg, seed=0):
    """Random params without compiling model.init (the scripts need no trained model)."""
    rs = np.random.RandomState(seed)
    return jax.tree.map(lambda s: rs.normal(0, 0.3, s.shape).astype(s.dtype), model.param_shapes(cfg))


LM = model.ModelConfig.gpt2(vocab_size=288, d_model=32, n_layers=2, n_heads=2, max_len=64)
RM = LM.replace(head="scalar")


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("workdirs")
    # the run config, where chat.py and generate.py read the vocabulary
    config = defaults.load_config(os.path.join(ROOT, "configs", "tiny.py") + ":stage=sft")
    config = config.to_json_best_effort()
    sft = save_workdir(
        root / "sft", "sft", random_params(LM), LM, ema_params=random_params(LM, 1), step=3, config=config
    )
    rm = save_workdir(root / "rm", "rm", random_params(RM), RM, step=3, config=config)
    both = {"policy": random_params(LM, 2), "value": random_params(RM, 3)}
    ppo = save_workdir(
        root / "ppo",
        "ppo",
        both,
        roles={"policy": LM, "value": RM},
        ema_params={"policy": random_params(LM, 4)},
        step=3,
        config=config,
    )
    return {"sft": sft, "rm": rm, "ppo": ppo}


def run(script, *args):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", script), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_stream_equals_generate_greedy():
    # Unrolled layers (stream unstacks them), GQA + rope, a prompt padded to its bucket (5 -> 8 slots).
    cfg = model.ModelConfig.llama(
        vocab_size=61,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        max_len=24,
        init_std=0.2,
        scan_layers=False,
    )
    params = random_params(cfg)
    prompt_P = np.array([3, 14, 15, 9, 2], np.int32)
    key = jax.random.key(0)

    def both(eos_id):
        out = sample.generate(
            cfg,
            params,
            prompt_P[None],
            key,
            max_new_tokens=10,
            temperature=0.0,
            eos_id=eos_id,
            return_info=True,
        )
        want = [int(t) for t in out.tokens_BT[0, : int(out.lengths_B[0])]]
        got = list(
            stream.stream(cfg, params, prompt_P, key, max_new_tokens=10, temperature=0.0, eos_id=eos_id)
        )
        return want, got

    want, got = both(None)
    assert got == want and len(got) == 10
    eos = want[3]  # EOS ends the stream after yielding it, like generate's response (EOS included)
    want, got = both(eos)
    assert got == want == want[: want.index(eos) + 1]
    with pytest.raises(ValueError, match="max_len"):  # checked at the call, not at the first next()
        stream.stream(cfg, params, np.zeros(30, np.int32), key, max_new_tokens=4)


def test_load_lm_picks_roles_and_refuses_scalar_heads(workdirs):
    cfg, params, vocab = checkpoint.load_lm(workdirs["ppo"], role="policy", ema=True)
    assert cfg == LM and vocab.vocab_size == 259  # tiny.py's data.vocab: bytes
    np.testing.assert_array_equal(params["embed"], random_params(LM, 4)["embed"])
    with pytest.raises(ValueError, match="'policy', 'value'"):
        checkpoint.load_lm(workdirs["ppo"])
    with pytest.raises(ValueError, match="role 'value' .* 'scalar' head"):
        checkpoint.load_lm(workdirs["ppo"], role="value")


def test_chat_prompt_mode_replies_and_drops_old_turns(workdirs):
    # max_len 64: the second turn's prompt (59 tokens) + 8 new ones no longer fits with the first turn in it.
    args = [
        "--checkpoint",
        workdirs["sft"],
        "--prompt",
        "hi",
        "--prompt",
        "hello again",
        "--max_new_tokens=8",
    ]
    proc = run("chat.py", *args, "--temperature=0", "--ema")
    assert proc.returncode == 0, proc.stderr[-2000:]
    replies = proc.stdout.splitlines()
    assert len(replies) == 2 and all(replies), proc.stdout
    assert "dropped the oldest turn" in proc.stderr


def test_chat_refuses_a_reward_model(workdirs):
    proc = run("chat.py", "--checkpoint", workdirs["rm"], "--prompt", "hi")
    assert proc.returncode != 0
    assert "'scalar' head: it scores text and cannot generate it" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_generate_names_the_malformed_prompts_file_line(workdirs, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"text": "b"}\n')
    proc = run("generate.py", "--checkpoint", workdirs["sft"], "--prompts_file", str(path))
    assert proc.returncode != 0
    assert f'{path}:3: expected an object with a string "prompt"' in proc.stderr


def test_generate_reads_prompts_from_flags_and_a_file(workdirs, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("bb\n\ncc\ndd\n")  # one prompt a line; blank lines skipped
    args = [
        "--checkpoint",
        workdirs["ppo"],
        "--role=policy",
        "--ema",
        "--prompt=aa",
        "--prompts_file",
        str(path),
    ]
    proc = run("generate.py", *args, "--max_new_tokens=4", "--batch_size=2", "--temperature=0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # Each completion: a header line, then the prompt and its continuation (random bytes, newlines included).
    blocks = proc.stdout.split("--- prompt ")[1:]
    assert [b.split(" [")[0].split("\n")[0] for b in blocks] == [f"{i} sample 0" for i in range(4)]
    assert [b.split("\n", 1)[1][:2] for b in blocks] == ["aa", "bb", "cc", "dd"]
