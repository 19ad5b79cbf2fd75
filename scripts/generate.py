"""Print sampled completions of prompts from a Hugging Face checkpoint dir or a training workdir.

    python scripts/generate.py --workdir runs/demo/sft --prompt "user: 2+2?" --chat --temperature 0
    python scripts/generate.py --hf_dir ~/models/gpt2 --prompt "Hello," --max_new_tokens 40 --top_p 0.9

The vocabulary is, in order: --vocab / --vocab_path, the HF dir's tokenizer, the workdir's training config
(data.vocab), else bytes (0..255 plus PAD/BOS/EOS).
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import app, flags

from gptjax import sample

_HF_DIR = flags.DEFINE_string(
    "hf_dir", None, "Hugging Face checkpoint directory (config.json + safetensors)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir with orbax checkpoints.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step in --workdir (default: latest).")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat the flag for several prompts.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt as a user message with the chat template.")
_BOS = flags.DEFINE_bool("bos", True, "Prepend BOS, as the training converters do.")
_NUM = flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate per completion.")
_TEMP = flags.DEFINE_float("temperature", 1.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_VOCAB = flags.DEFINE_enum("vocab", None, ["byte", "sentencepiece", "hf"], "Vocabulary kind override.")
_VOCAB_PATH = flags.DEFINE_string("vocab_path", "", "Vocabulary file for --vocab sentencepiece / hf.")


def _vocab_from(kind: str, path: str):
    import ml_collections

    from gptjax.data import vocab as vocab_lib

    return vocab_lib.get_vocabulary(ml_collections.ConfigDict({"vocab": {"kind": kind, "path": path}}))


def load():
    """(cfg, params, vocabulary) from the flags."""
    if bool(_HF_DIR.value) == bool(_WORKDIR.value):
        raise app.UsageError("pass exactly one of --hf_dir or --workdir")
    vocab = _vocab_from(_VOCAB.value, _VOCAB_PATH.value) if _VOCAB.value else None
    if _HF_DIR.value:
        from gptjax import hf

        cfg, params = hf.load(_HF_DIR.value)
        vocab = vocab or hf.load_tokenizer(_HF_DIR.value)
    else:
        from gptjax import checkpoint

        cfg, params = checkpoint.load_model(_WORKDIR.value, step=_STEP.value)
        if vocab is None:
            train_cfg = checkpoint.load_meta(_WORKDIR.value, _STEP.value)[1].get("config") or "{}"
            train_cfg = json.loads(train_cfg) if isinstance(train_cfg, str) else train_cfg
            v = train_cfg.get("data", {}).get("vocab", {"kind": "byte"})
            vocab = _vocab_from(v.get("kind", "byte"), v.get("path", ""))
    if vocab.vocab_size > cfg.vocab_size:
        raise ValueError(f"the vocabulary has {vocab.vocab_size} ids but the model only {cfg.vocab_size}")
    return cfg, params, vocab


def main(argv):
    del argv
    if not _PROMPT.value:
        raise app.UsageError("pass at least one --prompt")
    cfg, params, vocab = load()
    texts = [vocab.render_chat([{"role": "user", "content": p}]) if _CHAT.value else p for p in _PROMPT.value]
    ids = [([vocab.bos_id] if _BOS.value else []) + vocab.encode(t) for t in texts for _ in range(_NUM.value)]
    if min(map(len, ids)) == 0:
        raise app.UsageError("an empty prompt needs --bos")
    lengths = np.array([len(x) for x in ids], np.int32)
    prompts = np.full((len(ids), lengths.max()), vocab.pad_id, np.int32)
    for row, x in zip(prompts, ids, strict=True):
        row[: len(x)] = x
    out = sample.generate(
        cfg, params, prompts, jax.random.key(_SEED.value), prompt_lengths_B=lengths,
        max_new_tokens=_MAX_NEW.value, temperature=_TEMP.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
        eos_id=vocab.eos_id, pad_id=vocab.pad_id, return_info=True,
    )  # fmt: skip
    tokens = np.asarray(out.tokens_BT)
    for i, row in enumerate(tokens):
        end = "" if bool(out.ended_B[i]) else " [no EOS]"
        print(f"--- prompt {i // _NUM.value} sample {i % _NUM.value}{end}")
        print(texts[i // _NUM.value] + vocab.decode(row[: int(out.lengths_B[i])]))


if __name__ == "__main__":
    app.run(main)
