"""Vocabularies: bytes (default, no files), a local SentencePiece model, a Hugging Face ``tokenizer.json``.

Every vocabulary has the same small surface, used by the pipeline, sampling and the HF interop:

    vocab.vocab_size, vocab.pad_id, vocab.bos_id, vocab.eos_id
    vocab.encode(text) -> list[int]          # no BOS/EOS added: the feature converters add them explicitly
    vocab.decode(ids) -> str                 # stops at the first EOS, skips PAD/BOS
    vocab.render_chat(messages, add_generation_prompt=True) -> str

A Hugging Face tokenizer with a chat template renders chat with it, as transformers does
(``gptjax.data.chat_template``: ``chat_template.jinja``, ``tokenizer_config.json`` or ``chat_template.json``);
a template that cannot render the messages is an error naming its file. A vocabulary with no template at all
uses the plain format, and says so once in the log: each message renders as ``"<role>: <content>\\n"`` and the
generation prompt is ``"assistant: "``. The assistant's reply is followed by EOS (added by the SFT converter),
not by template text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

from absl import logging

from gptjax.data import chat_template as chat_template_lib

Message = dict[str, str]
ROLES = ("system", "user", "assistant")


def _check_messages(messages: Sequence[Message]) -> None:
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise TypeError(f"chat message {i} must be a dict with string 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"chat message {i} has role {m['role']!r}; use one of {ROLES}")


def render_plain_chat(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """The built-in text chat template: one ``role: content`` line per message."""
    _check_messages(messages)
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


# The plain chat format as a Jinja chat template: what exports of template-less vocabularies carry, so that
# transformers' apply_chat_template renders what the model was trained on (BOS first, as converters add it).
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)

_said_plain: set[str] = set()


def _plain_chat(what: str, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    """The plain format for a vocabulary without a chat template, said once per vocabulary in the log."""
    if what not in _said_plain:
        _said_plain.add(what)
        logging.info("%s has no chat template: chat renders as plain 'role: content' lines", what)
    return render_plain_chat(messages, add_generation_prompt)


def _cut_at_eos(ids: Sequence[int], eos_id: int) -> list[int]:
    ids = [int(i) for i in ids]
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


class ByteVocabulary:
    """UTF-8 bytes 0..255, then PAD=256, BOS=257, EOS=258 (vocab_size 259, the model config's default)."""

    def __init__(self):
        self.pad_id, self.bos_id, self.eos_id = 256, 257, 258
        self.vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        ids = _cut_at_eos(ids, self.eos_id)
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return _plain_chat("the byte vocabulary", messages, add_generation_prompt)


class SentencePieceVocabulary:
    """A SentencePiece model from ``scripts/train_tokenizer.py`` (its pad/bos/eos ids are stored in it)."""

    def __init__(self, path: str):
        # only SentencePiece vocabularies need it
        import sentencepiece as spm

        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"SentencePiece model {path!r} not found; train one with scripts/train_tokenizer.py"
            )
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
        for name, i in (("pad", self.pad_id), ("bos", self.bos_id), ("eos", self.eos_id)):
            if i < 0:
                raise ValueError(
                    f"SentencePiece model {path!r} has no {name} token; retrain with "
                    "scripts/train_tokenizer.py, which defines pad/bos/eos"
                )
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        ids = [i for i in _cut_at_eos(ids, self.eos_id) if i not in (self.pad_id, self.bos_id)]
        return self._sp.decode(ids)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        return _plain_chat(f"SentencePiece model {self.path}", messages, add_generation_prompt)


SP_SPECIAL = {"pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3}


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
) -> str:
    """Train a SentencePiece model on ``texts`` locally; returns the ``.model`` path.

    PAD/UNK/BOS/EOS get ids 0-3 and byte fallback is on, so any UTF-8 text encodes without UNK.
    # only SentencePiece vocabularies need it
    """
    import sentencepiece as spm

    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("train_sentencepiece: no text to train on")
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    try:
        _train_spm(spm, texts, model_prefix, vocab_size, model_type, character_coverage)
    except RuntimeError as e:
        if "Vocabulary size is smaller" not in str(e):
            raise
        raise ValueError(
            f"train_sentencepiece: vocab_size={vocab_size} is too small: the 256 byte pieces, 4 special "
            f"tokens and every character of the text need an id each ({str(e).split('. ')[-2]})"
        ) from None
    return model_prefix + ".model"


def _train_spm(spm, texts, model_prefix, vocab_size, model_type, character_coverage):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        hard_vocab_limit=False,
        max_sentence_length=1 << 16,
        minloglevel=2,
        **SP_SPECIAL,
    )


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # older tokenizer_config.json stores AddedToken dicts
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_id(tok, config: dict, key: str, candidates: Sequence[str]) -> int | None:
    value = _token_text(config.get(key))
    for name in ([value] if value is not None else []) + list(candidates):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return None


# The special tokens transformers hands a chat template by name (those the tokenizer's config names).
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class HuggingFaceVocabulary:
    """A Hugging Face fast tokenizer (``tokenizer.json``) so imported checkpoints keep their own tokenizer.

    ``path`` is a checkpoint directory (with ``tokenizer.json`` and optionally ``tokenizer_config.json`` /
    ``special_tokens_map.json``, whose special tokens are used, and a chat template wherever transformers
    keeps one) or the ``tokenizer.json`` file itself. Missing PAD falls back to EOS (GPT-2 style); missing
    BOS falls back to EOS too.
    """

    def __init__(self, path: str):
        # only Hugging Face tokenizers need it
        from tokenizers import Tokenizer

        tok_file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"no tokenizer.json at {path!r}: pass a checkpoint directory or the file")
        self.path = tok_file
        self._tok = Tokenizer.from_file(tok_file)
        directory = os.path.dirname(tok_file)
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins (transformers)
            if os.path.isfile(os.path.join(directory, name)):
                with open(os.path.join(directory, name)) as f:
                    config.update(json.load(f))
        self.template = chat_template_lib.find(directory, config)
        self.chat_template: str | None = self.template.text if self.template else None  # '': unusable
        named = {k: _token_text(config.get(k)) for k in TEMPLATE_TOKENS}
        self._template_tokens = {k: t for k, t in named.items() if t is not None}
        self.eos_id = _special_id(
            self._tok, config, "eos_token", ["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"]
        )
        if self.eos_id is None:
            raise ValueError(f"{tok_file}: cannot find an EOS token; set eos_token in tokenizer_config.json")
        self.bos_id = _special_id(self._tok, config, "bos_token", ["<s>", "<|begin_of_text|>", "<bos>"])
        self.pad_id = _special_id(self._tok, config, "pad_token", ["<pad>", "[PAD]"])
        self.bos_id = self.eos_id if self.bos_id is None else self.bos_id
        self.pad_id = self.eos_id if self.pad_id is None else self.pad_id
        self._bos_token = self._tok.id_to_token(self.bos_id)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [i for i in _cut_at_eos(ids, self.eos_id) if i not in (self.pad_id, self.bos_id)]
        return self._tok.decode(ids, skip_special_tokens=False)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        if self.template is None:
            return _plain_chat(f"tokenizer {self.path}", messages, add_generation_prompt)
        _check_messages(messages)
        text = self.template.render(messages, add_generation_prompt, self._template_tokens)
        # The converters add BOS themselves; a template that starts with it would double it.
        return text.removeprefix(self._bos_token)


Vocabulary = ByteVocabulary | SentencePieceVocabulary | HuggingFaceVocabulary
KINDS = ("byte", "sentencepiece", "hf")


def get_vocabulary(data_cfg) -> Vocabulary:
    """The vocabulary named by ``data_cfg.vocab`` (kind 'byte' | 'sentencepiece' | 'hf', path)."""
    v = data_cfg.vocab
    if v.kind == "byte":
        return ByteVocabulary()
    if v.kind in ("sentencepiece", "hf") and not v.path:
        raise ValueError(f"data.vocab.kind={v.kind!r} needs data.vocab.path")
    if v.kind == "sentencepiece":
        return SentencePieceVocabulary(v.path)
    if v.kind == "hf":
        return HuggingFaceVocabulary(v.path)
    raise ValueError(f"data.vocab.kind={v.kind!r} is unknown; use one of {KINDS}")
