"""Print sampled completions of prompts from a training workdir (any stage with an LM head) or a Hugging Face
checkpoint dir.

    python scripts/generate.py --checkpoint runs/demo/sft --prompt "2+2?" --chat --temperature 0
    python scripts/generate.py --checkpoint runs/ppo --role policy --ema --prompts_file prompts.jsonl
    python scripts/generate.py --hf_dir ~/models/gpt2 --prompt "Hello," --max_new_tokens 40 --top_p 0.9

Prompts come from --prompt (repeatable) and --prompts_file: one prompt per line, or for a ``.jsonl`` file
one ``{"prompt": ...}`` object per line (blank lines are skipped). --checkpoint, --workdir and --hf_dir all
name the model (a workdir or an HF dir); --role picks a role of a multi-role run (PPO's 'policy'), --ema its
EMA weights. A reward model (scalar head) is refused. A completion takes --max_new_tokens tokens at most: by
default up to 64, fewer where the longest prompt leaves less of the model's context (max_len).
The vocabulary is, in order: --vocab / --vocab_path, the HF dir's tokenizer, the workdir's training config
(data.vocab), else bytes (0..255 plus PAD/BOS/EOS). --verbose: library logs and tracebacks.
A PPO run's greedy or low-temperature answers: take its EMA weights (--role policy --ema); the policy's own
sharpen its sampled answers but can lose at the mode (docs/results.md, "PPO's greedy answers").
"""

from __future__ import annotations

import json
import sys
import types

import jax
import numpy as np
from absl import app, flags, logging

from gptjax import checkpoint
from gptjax.data import vocab as vocab_lib
from gptjax.model import sample
from gptjax.train import console

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or Hugging Face checkpoint dir.")
_HF_DIR = flags.DEFINE_string(
    "hf_dir", None, "Hugging Face checkpoint directory (config.json + safetensors)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with orbax checkpoints.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step in a workdir (default: latest).")
_ROLE = flags.DEFINE_string("role", None, "Role of a multi-role workdir, e.g. PPO's 'policy'.")
_EMA = flags.DEFINE_bool("ema", False, "Load the workdir's EMA weights.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat the flag for several prompts.")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, 'One prompt per line, or a .jsonl file of {"prompt": ...} lines.'
)
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt as a user message with the chat template.")
_BOS = flags.DEFINE_bool("bos", True, "Prepend BOS, as the training converters do.")
_NUM = flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Completions sampled per generate call.")
_MAX_NEW = flags.DEFINE_integer(
    "max_new_tokens", None, "Most tokens per completion (default: up to 64, as the model's context allows)."
)
_TEMP = flags.DEFINE_float("temperature", 1.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
# --vocab's names -> data.vocab.kind ('byte' as the config spells it works too)
VOCABS = {"bytes": "byte", "byte": "byte", "sentencepiece": "sentencepiece", "hf": "hf"}
_VOCAB = flags.DEFINE_enum(
    "vocab",
    None,
    list(VOCABS),
    "Vocabulary override: bytes (0..255 plus PAD/BOS/EOS), sentencepiece or hf (a tokenizer.json or HF "
    "directory), the last two with --vocab_path.",
)
_VOCAB_PATH = flags.DEFINE_string("vocab_path", "", "Vocabulary file for --vocab sentencepiece / hf.")
DEFAULT_MAX_NEW = 64


def read_prompts(path: str) -> list[str]:
    """Prompts of a text file (one a line) or a .jsonl file ({"prompt": ...} a line); blank lines skipped."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not path.endswith(".jsonl"):
                prompts.append(line.rstrip("\r\n"))
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                got = line.strip()[:80]
                raise ValueError(f'{path}:{n}: expected an object with a string "prompt", got {got}')
            prompts.append(row["prompt"])
    return prompts


def vocab_override(name: str | None, path: str):
    """The vocabulary named by --vocab / --vocab_path, or None."""
    if not name:
        return None
    kind = VOCABS[name]
    if kind != "byte" and not path:
        raise ValueError(f"--vocab={name} needs --vocab_path (the tokenizer's file or directory)")
    return vocab_lib.get_vocabulary(types.SimpleNamespace(vocab=types.SimpleNamespace(kind=kind, path=path)))


def max_new_tokens(max_len: int, prompt_lengths: list[int], asked: int | None) -> int:
    """--max_new_tokens, or by default up to 64 where the longest prompt leaves that much of the model's
    context; raises naming the prompt that leaves no room (an explicit --max_new_tokens is checked by
    ``sample.generate``: past max_len a rotary model only warns)."""
    if asked is not None:
        if asked < 1:
            raise ValueError(f"--max_new_tokens={asked} must be >= 1")
        return asked
    longest = max(prompt_lengths)
    if longest >= max_len:
        raise ValueError(
            f"prompt {prompt_lengths.index(longest)} is {longest} tokens: it leaves no room for a completion "
            f"in the model's context of {max_len} tokens: shorten it"
        )
    return min(DEFAULT_MAX_NEW, max_len - longest)


def main(argv):
    del argv
    console.setup_logging(logging.WARNING)  # the completions on stdout; only warnings on stderr
    paths = [p for p in (_CHECKPOINT.value, _HF_DIR.value, _WORKDIR.value) if p]
    if len(paths) != 1:
        raise app.UsageError("pass exactly one of --checkpoint, --hf_dir or --workdir")
    try:
        prompts = list(_PROMPT.value) + (read_prompts(_PROMPTS_FILE.value) if _PROMPTS_FILE.value else [])
        if not prompts:
            raise app.UsageError("pass at least one --prompt or a non-empty --prompts_file")
        vocab = vocab_override(_VOCAB.value, _VOCAB_PATH.value)
        cfg, params, vocab = checkpoint.load_lm(
            paths[0], _STEP.value, role=_ROLE.value, ema=_EMA.value, vocab=vocab
        )
    except (ValueError, OSError) as e:
        sys.exit(f"generate.py: error: {e}")
    texts = [vocab.render_chat([{"role": "user", "content": p}]) if _CHAT.value else p for p in prompts]
    ids = [([vocab.bos_id] if _BOS.value else []) + vocab.encode(t) for t in texts for _ in range(_NUM.value)]
    if min(map(len, ids)) == 0:
        raise app.UsageError("an empty prompt needs --bos")
    try:
        max_new = max_new_tokens(cfg.max_len, [len(x) for x in ids[:: _NUM.value]], _MAX_NEW.value)
    except ValueError as e:
        sys.exit(f"generate.py: error: {e}")
    rng = jax.random.key(_SEED.value)
    for start in range(0, len(ids), _BATCH.value):  # the first batch keeps the seed's own key (as before)
        batch = ids[start : start + _BATCH.value]
        lengths = np.array([len(x) for x in batch], np.int32)
        prompts_BP = np.full((len(batch), lengths.max()), vocab.pad_id, np.int32)
        for row, x in zip(prompts_BP, batch, strict=True):
            row[: len(x)] = x
        key = jax.random.fold_in(rng, start) if start else rng
        try:  # e.g. a prompt longer than the model's context
            out = sample.generate(
                cfg, params, prompts_BP, key, prompt_lengths_B=lengths, max_new_tokens=max_new,
                temperature=_TEMP.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                eos_id=vocab.eos_id, pad_id=vocab.pad_id, return_info=True,
            )  # fmt: skip
        except ValueError as e:
            sys.exit(f"generate.py: error: {e}")
        for i, row in enumerate(np.asarray(out.tokens_BT), start):
            end = "" if bool(out.ended_B[i - start]) else " [no EOS]"
            print(f"--- prompt {i // _NUM.value} sample {i % _NUM.value}{end}")
            print(texts[i // _NUM.value] + vocab.decode(row[: int(out.lengths_B[i - start])]), flush=True)


if __name__ == "__main__":
    console.main(main)
