"""Vocabularies: bytes, a locally trained SentencePiece model, and a Hugging Face tokenizer.json wrapper."""

import json
import subprocess
import sys

import numpy as np
import pytest

from gptjax import data
from gptjax.data import tiny
from gptjax.data import vocab as vocab_lib

TEXTS = ["héllo wörld ✓", "rev abcd=dcba", "line one\nline two", "  spaced  out  ", "数字 123 456"]


def test_byte_vocabulary():
    v = data.get_vocabulary(data.default_config())
    assert (v.vocab_size, v.pad_id, v.bos_id, v.eos_id) == (259, 256, 257, 258)
    for t in TEXTS:
        ids = v.encode(t)
        assert max(ids) < 256 and v.decode(ids) == t
    assert v.encode("A") == [65]
    assert v.decode([v.bos_id, 104, 105, v.eos_id, 120, v.pad_id]) == "hi"  # stops at EOS, skips specials
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert v.render_chat(msgs) == "system: be brief\nuser: hi\nassistant: "
    assert v.render_chat(msgs, add_generation_prompt=False) == "system: be brief\nuser: hi\n"
    with pytest.raises(ValueError, match="role 'bot'"):
        v.render_chat([{"role": "bot", "content": "x"}])
    with pytest.raises(TypeError, match="chat message 0"):
        v.render_chat([{"role": "user"}])
    cfg = data.default_config()
    cfg.vocab.kind = "wordpiece"
    with pytest.raises(ValueError, match="data.vocab.kind='wordpiece'"):
        data.get_vocabulary(cfg)
    cfg.vocab.kind = "sentencepiece"
    with pytest.raises(ValueError, match="needs data.vocab.path"):
        data.get_vocabulary(cfg)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    texts = [r["text"] for r in tiny.text_records(0, 400)] + TEXTS
    return vocab_lib.train_sentencepiece(texts, str(tmp_path_factory.mktemp("spm") / "tiny"), vocab_size=320)


def test_sentencepiece_round_trip_and_pipeline(spm_model):
    cfg = data.tiny_config("sft")
    cfg.tiny.update({"num_sft": 200, "num_eval": 20})
    cfg.vocab.kind, cfg.vocab.path = "sentencepiece", spm_model
    v = data.get_vocabulary(cfg)
    assert (v.pad_id, v.bos_id, v.eos_id) == (0, 2, 3) and v.vocab_size == 320
    for t in TEXTS:
        assert v.decode(v.encode(t)) == t  # byte fallback: no UNK, exact round trip
    assert len(v.encode("rev abcd=dcba")) < len("rev abcd=dcba")  # it learned merges
    assert v.decode([v.bos_id] + v.encode("ab") + [v.eos_id] + v.encode("cd")) == "ab"
    it = data.make_iterator(cfg, stage="sft", batch_size=2, seq_len=32, seed=0, shard_index=0, num_shards=1)
    b = next(it)
    trained = b["targets_BL"][b["weights_BL"] > 0]
    assert v.eos_id in trained.tolist() and b["inputs_BL"][0, 0] == v.bos_id
    with pytest.raises(FileNotFoundError, match="train one with scripts/train_tokenizer.py"):
        vocab_lib.SentencePieceVocabulary(spm_model + ".missing")


def test_train_tokenizer_script(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": r["text"], "n": 1}) + "\n" for r in tiny.text_records(1, 200))
    )
    out = subprocess.run(
        [
            sys.executable,
            "scripts/train_tokenizer.py",
            f"--input={corpus}",
            "--field=text",
            "--vocab_size=400",
            f"--out={tmp_path / 'spm'}",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=__file__.rsplit("/tests/", 1)[0],
    )
    assert "vocab_size=400" in out.stdout
    v = vocab_lib.SentencePieceVocabulary(str(tmp_path / "spm.model"))
    assert v.vocab_size == 400 and v.decode(v.encode("rev abc=cba\nup ab=AB")) == "rev abc=cba\nup ab=AB"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 5}\n')
    res = subprocess.run(
        [
            sys.executable,
            "scripts/train_tokenizer.py",
            f"--input={bad}",
            "--field=text",
            f"--out={tmp_path / 'x'}",
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=__file__.rsplit("/tests/", 1)[0],
    )
    assert res.returncode != 0 and "bad.jsonl:2: field 'text'" in res.stderr


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<pad>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([r["text"] for r in tiny.text_records(0, 300)] + TEXTS, trainer)
    d = tmp_path_factory.mktemp("hf")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": "<|endoftext|>",
                "bos_token": "<s>",
                "pad_token": "<pad>",
                "chat_template": CHAT_TEMPLATE,
                "tokenizer_class": "PreTrainedTokenizerFast",
            }
        )
    )
    return d


def test_huggingface_vocabulary_matches_transformers(hf_dir):
    v = vocab_lib.HuggingFaceVocabulary(str(hf_dir))
    assert (v.eos_id, v.pad_id, v.bos_id) == (0, 1, 2) and v.vocab_size == 400
    transformers = pytest.importorskip("transformers")
    ref = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(hf_dir / "tokenizer.json"),
        eos_token="<|endoftext|>",
        bos_token="<s>",
        pad_token="<pad>",
    )
    for t in TEXTS:
        ids = v.encode(t)
        assert ids == ref.encode(t, add_special_tokens=False)
        assert v.decode(ids) == t == ref.decode(ids)
    msgs = [{"role": "user", "content": "rev abc="}, {"role": "assistant", "content": "cba"}]
    want = ref.apply_chat_template(
        msgs[:1], chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert (
        want.startswith("<s>") and v.render_chat(msgs[:1]) == want[len("<s>") :]
    )  # BOS comes from the converter
    assert v.decode(v.encode("ab") + [v.eos_id] + v.encode("cd")) == "ab"
    # A lone tokenizer.json works too: the plain chat template, and the specials found by their usual names.
    alone = hf_dir / "alone"
    alone.mkdir(exist_ok=True)
    (alone / "tok.json").write_text((hf_dir / "tokenizer.json").read_text())
    bare = vocab_lib.HuggingFaceVocabulary(str(alone / "tok.json"))
    assert bare.eos_id == 0 and bare.render_chat(msgs[:1]) == "user: rev abc=\nassistant: "
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        vocab_lib.HuggingFaceVocabulary(str(hf_dir / "nope"))


def test_huggingface_vocabulary_in_the_pipeline(hf_dir, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"rev {w}="}, {"role": "assistant", "content": w[::-1]}]}
        for w in ("abc", "bcd", "cde", "def")
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = data.default_config()
    cfg.vocab.kind, cfg.vocab.path = "hf", str(hf_dir)
    cfg.sources.chat = data.source(format="sft", path=str(tmp_path / "chat.jsonl"))
    v = data.get_vocabulary(cfg)
    it = data.make_iterator(cfg, stage="sft", batch_size=1, seq_len=64, seed=0, shard_index=0, num_shards=1)
    b = next(it)
    segs = b["segment_ids_BL"][0]
    first = b["inputs_BL"][0, segs == 1].tolist()
    # BOS + the checkpoint's own chat template (EOS after each turn) + response + EOS; loss on the last two.
    want = {}
    for r in rows:
        prompt = [v.bos_id] + v.encode(v.render_chat(r["messages"][:1]))
        want[tuple(prompt + v.encode(r["messages"][1]["content"]) + [v.eos_id])] = len(prompt)
    assert tuple(first) in want and first.count(v.eos_id) == 2
    n_prompt = want[tuple(first)]
    trained = b["targets_BL"][0, (segs == 1) & (b["weights_BL"][0] > 0)].tolist()
    assert trained == first[n_prompt:]
    assert np.all(b["inputs_BL"][0, segs == 0] == v.pad_id)
