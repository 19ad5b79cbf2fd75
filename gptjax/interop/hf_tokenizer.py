"""The tokenizer half of a Hugging Face directory: what an export carries so that transformers'
``AutoTokenizer`` and ``generate`` work on it as they are, and what an import brings along.

    ids = write(tokenizer, dst, vocab_size, max_len)   # tokenizer files + generation_config.json;
                                                       # the bos / eos / pad ids for config.json
    copy_tokenizer(src, dst)             # an HF tokenizer's files, chat templates included
    write_byte_tokenizer(dst, max_len)   # transformers' tokenizer for gptjax's byte vocabulary

``tokenizer`` is an HF tokenizer (a directory, a tokenizer.json, or a ``HuggingFaceVocabulary``: its files are
copied) or the byte vocabulary (a ``ByteVocabulary``, or ``"byte"``): then a byte-level tokenizer is written
whose ids are the byte vocabulary's (byte b is id b; PAD 256, BOS 257, EOS 258), with BOS added in front of
every text as gptjax's converters add it, and the plain chat format as its chat template. The special ids go
to config.json and, unless the source tokenizer brought its own, to generation_config.json.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from gptjax.data import chat_template
from gptjax.data.vocab import PLAIN_CHAT_TEMPLATE, ByteVocabulary, HuggingFaceVocabulary

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    *chat_template.FILES,
    "generation_config.json",
)
GENERATION_CONFIG = "generation_config.json"
# Names of the byte vocabulary's special tokens in its HF tokenizer (ids: ByteVocabulary's).
BYTE_SPECIALS = {"pad": "<|pad|>", "bos": "<|bos|>", "eos": "<|eos|>"}


def _byte_chars() -> list[str]:
    """The printable character byte-level BPE (GPT-2) uses for each byte 0..255.

    Bytes that are printable Latin-1 characters stand for themselves; the others are given the code points
    from 256 up, in byte order, so no byte is whitespace or a control character inside the tokenizer.
    """
    ranges = (("!", "~"), ("¡", "¬"), ("®", "ÿ"))
    printable = {b for lo, hi in ranges for b in range(ord(lo), ord(hi) + 1)}
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def write_byte_tokenizer(dst: str, model_max_length: int) -> list[str]:
    """tokenizer.json, tokenizer_config.json and chat_template.jinja for the byte vocabulary in ``dst``."""
    # tokenizers is a dependency of gptjax; only exports of the byte vocabulary build one
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    byte = ByteVocabulary()
    ids = {name: getattr(byte, f"{name}_id") for name in BYTE_SPECIALS}
    vocab = {c: b for b, c in enumerate(_byte_chars())}
    vocab.update({BYTE_SPECIALS[name]: i for name, i in ids.items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_SPECIALS[n], special=True, normalized=False) for n in ids])
    bos = BYTE_SPECIALS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids["bos"])]
    )
    os.makedirs(dst, exist_ok=True)
    tok.save(os.path.join(dst, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{f"{name}_token": text for name, text in BYTE_SPECIALS.items()},
        "model_max_length": int(model_max_length),
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(dst, chat_template.JINJA_FILE), "w", encoding="utf-8") as f:
        f.write(PLAIN_CHAT_TEMPLATE)
    return ["tokenizer.json", "tokenizer_config.json", chat_template.JINJA_FILE]


def copy_tokenizer(src: str, dst: str) -> list[str]:
    """Copy the tokenizer files found next to ``src`` (a directory or a tokenizer.json) into ``dst``,
    chat templates (and transformers' ``additional_chat_templates/``) included."""
    src = os.fspath(src)
    src_dir = src if os.path.isdir(src) else os.path.dirname(src)
    if os.path.abspath(src_dir) == os.path.abspath(dst):
        return [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(dst, n))]
    copied = []
    for name in TOKENIZER_FILES:
        f = os.path.join(src_dir, name)
        if os.path.isfile(f):
            shutil.copyfile(f, os.path.join(dst, name))
            copied.append(name)
    extra = os.path.join(src_dir, chat_template.TEMPLATE_DIR)
    if os.path.isdir(extra):
        shutil.copytree(extra, os.path.join(dst, chat_template.TEMPLATE_DIR), dirs_exist_ok=True)
        copied.append(chat_template.TEMPLATE_DIR + "/")
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise FileNotFoundError(f"{src}: no tokenizer.json or tokenizer.model to copy")
    return copied


def is_byte(tokenizer: Any) -> bool:
    return isinstance(tokenizer, ByteVocabulary) or tokenizer == "byte"


def special_ids(tokenizer: Any) -> dict[str, int | None]:
    """bos/eos/pad ids for config.json: a vocabulary's, or those of the tokenizer.json at a path (None
    where unknown: a SentencePiece-only tokenizer keeps its ids in its own files)."""
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if is_byte(tokenizer):
        tokenizer = ByteVocabulary()
    elif not hasattr(tokenizer, "eos_id"):
        src = os.fspath(tokenizer)
        if not os.path.isfile(src if src.endswith(".json") else os.path.join(src, "tokenizer.json")):
            return {}
        tokenizer = HuggingFaceVocabulary(src)
    return {f"{k}_token_id": int(getattr(tokenizer, f"{k}_id")) for k in ("bos", "eos", "pad")}


def write(tokenizer: Any, dst: str, vocab_size: int, max_len: int) -> dict[str, int | None]:
    """The tokenizer files for an export in ``dst`` (module doc); returns the ids config.json records.

    Without a tokenizer the ids are written as null: a family's defaults (GPT-2's 50256) would point
    outside the vocabulary.
    """
    if is_byte(tokenizer):
        if vocab_size < ByteVocabulary().vocab_size:
            raise ValueError(
                f"the byte vocabulary has {ByteVocabulary().vocab_size} ids but the model only {vocab_size}: "
                "pass the tokenizer the model was trained with"
            )
        copied = write_byte_tokenizer(dst, max_len)
    elif tokenizer is not None:
        copied = copy_tokenizer(getattr(tokenizer, "path", tokenizer), dst)
    else:
        copied = []
    ids = special_ids(tokenizer)
    if GENERATION_CONFIG not in copied and any(v is not None for v in ids.values()):
        with open(os.path.join(dst, GENERATION_CONFIG), "w") as f:
            json.dump({k: v for k, v in ids.items() if v is not None}, f, indent=2)
    return ids
