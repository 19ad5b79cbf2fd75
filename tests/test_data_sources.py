"""Sources: every format from JSONL, text files and a TFDS dataset built here; bad input names its place."""

import json

import numpy as np
import pytest

from gptjax import data
from gptjax.data import sources

tfds = pytest.importorskip("tensorflow_datasets")


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _cfg(**sources_kw):
    cfg = data.default_config()
    for name, src in sources_kw.items():
        cfg.sources[name] = src
    return cfg


def _it(cfg, stage, **kw):
    kw = {"batch_size": 2, "seq_len": 48, "seed": 0, "shard_index": 0, "num_shards": 1, **kw}
    return data.make_iterator(cfg, stage=stage, **kw)


def _records(cfg, stage, split="train"):
    from gptjax.data import pipeline

    counts = __import__("collections").defaultdict(__import__("collections").Counter)
    out = pipeline.load_records(cfg, stage, split, data.get_vocabulary(cfg), counts)
    return out, counts


class TinyRecords(tfds.core.GeneratorBasedBuilder):
    """A six-example dataset holding the fields of every record format (built in a temp dir by the tests)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "body": text,
                    "question": text,
                    "answer": text,
                    "ranked": tfds.features.Sequence(text),
                    "chosen": text,
                    "rejected": text,
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(6), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield (
                i,
                {
                    "body": f"document number {i}",
                    "question": f"q{i}?",
                    "answer": f"a{i}",
                    "ranked": [f"best{i}", f"mid{i}", f"worst{i}"][: 2 + i % 2],
                    "chosen": f"good{i}",
                    "rejected": f"bad{i}",
                },
            )


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tfds"))
    TinyRecords(data_dir=d).download_and_prepare()
    return d


def test_jsonl_all_formats_with_field_mapping_and_chat(tmp_path):
    text = _write_jsonl(tmp_path / "t.jsonl", [{"body": "hello world"}, {"body": "second doc"}])
    sft = _write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"q": "2+2=", "a": "4"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        ],
    )
    rank = _write_jsonl(
        tmp_path / "r.jsonl",
        [
            {"q": "pick", "responses": ["A", "B", "C"]},
            {"q": "pair", "chosen": "yes", "rejected": "no"},
            {"q": "scored", "responses": ["lo", "hi", "mid"], "scores": [0.1, 0.9, 0.5]},
            {"q": "tie", "chosen": "same", "rejected": "same"},
            {"q": "tie3", "responses": ["x", "y", "z"], "scores": [2, 2, 1]},
        ],
    )
    prompt = _write_jsonl(
        tmp_path / "p.jsonl", [{"q": "go"}, {"messages": [{"role": "user", "content": "yo"}]}]
    )
    f = {"prompt": "q", "response": "a"}
    cfg = _cfg(
        t=data.source(format="text", path=text, fields={"text": "body"}),
        s=data.source(format="sft", path=sft, fields=f),
        r=data.source(format="rank", path=rank, fields=f),
        p=data.source(format="prompt", path=prompt, fields=f),
    )
    out, _ = _records(cfg, "pretrain")
    assert out == {"t": [{"text": "hello world"}, {"text": "second doc"}]}
    out, counts = _records(cfg, "sft")
    assert out["s"] == [
        {"prompt": "2+2=", "response": "4"},
        {"prompt": "user: hi\nassistant: ", "response": "hello"},
    ]
    assert out["r"][0] == {"prompt": "pick", "response": "A"}  # rankings give SFT their best response
    out, counts = _records(cfg, "rm")
    assert out["r"] == [
        {"prompt": "pick", "responses": ["A", "B", "C"]},
        {"prompt": "pair", "responses": ["yes", "no"]},
        {"prompt": "scored", "responses": ["hi", "mid", "lo"]},
        {"prompt": "tie3", "responses": ["x", "z"]},
    ]
    assert counts["r"]["rank_records_dropped_ties"] == 1 and counts["r"]["rank_tied_responses_dropped"] == 2
    out, _ = _records(cfg, "prompts")
    assert out["p"] == [{"prompt": "go"}, {"prompt": "user: yo\nassistant: "}]
    assert [r["prompt"] for r in out["s"]] == ["2+2=", "user: hi\nassistant: "]

    # End to end: K = the most responses of any record; the pair record leaves one slot invalid.
    it = _it(cfg, "rm", batch_size=4)
    b = next(it)
    assert b["tokens_BKL"].shape == (4, 3, 48)
    assert sorted(b["valid_BK"].sum(1).tolist()) == [2, 2, 3, 3]
    assert it.stats()["r/rank_records_dropped_ties"] == 1


def test_text_files_split_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\nsecond doc\n\n\n")
    (tmp_path / "b.txt").write_text("third doc")
    cfg = _cfg(c=data.source(format="text", path=str(tmp_path / "*.txt")))
    out, _counts = _records(cfg, "pretrain")
    assert [r["text"] for r in out["c"]] == ["first doc\nline two", "second doc", "third doc"]
    cfg.sources.c.doc_separator = "\n"
    out, _ = _records(cfg, "pretrain")
    assert len(out["c"]) == 4


def test_tfds_every_format(tfds_dir):
    common = {"tfds": "tiny_records", "data_dir": tfds_dir}
    f = {"text": "body", "prompt": "question", "response": "answer", "responses": "ranked"}
    cfg = _cfg(
        t=data.source(format="text", fields=f, **common),
        s=data.source(format="sft", fields=f, **common),
        r=data.source(format="rank", fields=f, **common),
        p=data.source(format="prompt", fields=f, validation_split="test", **common),
        pair=data.source(format="rank", fields={"prompt": "question"}, stages="rm", **common),
    )
    out, _counts = _records(cfg, "pretrain")
    assert sorted(r["text"] for r in out["t"]) == [f"document number {i}" for i in range(6)]
    out, _ = _records(cfg, "sft")
    assert min(out["s"], key=str) == {"prompt": "q0?", "response": "a0"}
    out, _ = _records(cfg, "rm")
    assert {r["prompt"]: r["responses"] for r in out["r"]}["q1?"] == ["best1", "mid1", "worst1"]
    assert {r["prompt"]: r["responses"] for r in out["pair"]}["q1?"] == ["good1", "bad1"]
    out, _ = _records(cfg, "prompts", split="validation")
    assert sorted(r["prompt"] for r in out["p"]) == ["q0?", "q1?"]
    it = _it(cfg, "sft", batch_size=3, seq_len=16)
    b = next(it)
    assert b["inputs_BL"].shape == (3, 16) and b["weights_BL"].sum() > 0


@pytest.mark.parametrize(
    ("rows", "fmt", "match", "exc"),
    [
        (['{"text": "ok"}', '{"text": "broken'], "text", r"bad\.jsonl:2: malformed JSON", ValueError),
        ([{"prompt": "p"}], "sft", r"bad\.jsonl:1: missing field 'response'", ValueError),
        ([{"text": 3}], "text", r"bad\.jsonl:1: field 'text' must be a string, got int", TypeError),
        ([{"prompt": "p", "responses": ["a", 1]}], "rank", r"bad\.jsonl:1: field 'responses'", ValueError),
        (
            [{"prompt": "p", "responses": ["a", "b"], "scores": [1]}],
            "rank",
            r"bad\.jsonl:1: field 'scores'",
            ValueError,
        ),
        ([{"prompt": "p"}], "rank", r"bad\.jsonl:1: missing field 'responses'", ValueError),
        (["[1, 2]"], "text", r"bad\.jsonl:1: a record must be a JSON object", TypeError),
        ([], "text", r"bad\.jsonl: empty file", ValueError),
    ],
)
def test_bad_jsonl_names_file_line_and_field(tmp_path, rows, fmt, match, exc):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = _cfg(bad=data.source(format=fmt, path=path))
    stage = {"text": "pretrain", "sft": "sft", "rank": "rm", "prompt": "prompts"}[fmt]
    with pytest.raises(exc, match=match):
        _it(cfg, stage)


def test_bad_sources_and_config(tmp_path, tfds_dir):
    cfg = _cfg(x=data.source(format="text", tfds="no_such_dataset_abc", data_dir=tfds_dir))
    with pytest.raises(ValueError, match="TFDS dataset 'no_such_dataset_abc'.*does not exist"):
        _it(cfg, "pretrain")
    cfg = _cfg(x=data.source(format="text", tfds="tiny_records", data_dir=tfds_dir, split="nope"))
    with pytest.raises(ValueError, match="has no split 'nope'"):
        _it(cfg, "pretrain")
    cfg = _cfg(x=data.source(format="text", path=str(tmp_path / "missing*.jsonl")))
    with pytest.raises(FileNotFoundError, match=r"data.sources.x.path: no file matches"):
        _it(cfg, "pretrain")
    (tmp_path / "empty.txt").write_text("\n\n")
    cfg = _cfg(x=data.source(format="text", path=str(tmp_path / "empty.txt")))
    with pytest.raises(ValueError, match=r"empty\.txt: empty file"):
        _it(cfg, "pretrain")
    with pytest.raises(KeyError, match="unknown key 'paht'"):
        data.source(format="text", paht="x")
    with pytest.raises(KeyError, match="fields"):
        data.source(fields={"txt": "body"})
    cfg = data.default_config()
    with pytest.raises(AttributeError, match="overflw"):
        cfg.overflw = "drop"
    cfg.sources.a = data.source(format="sft", path="x.jsonl")
    with pytest.raises(ValueError, match="no data source feeds stage 'rm'"):
        _it(cfg, "rm")
    cfg.mixture = "a:1,b:1"
    with pytest.raises(ValueError, match="data.mixture names source 'b'"):
        _it(cfg, "sft")


def test_overflow_policy_counts_truncated_and_dropped(tmp_path):
    path = _write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"prompt": "p" * 5, "response": "r" * 5},
            {"prompt": "p" * 5, "response": "r" * 40},
            {"prompt": "p" * 30, "response": "r"},
        ],
    )
    cfg = _cfg(s=data.source(format="sft", path=path))
    cfg.overflow = "truncate"
    it = _it(cfg, "sft", seq_len=20)
    stats = it.stats()
    assert stats["s/demonstrations_truncated"] == 2  # both long records cut to 20 tokens
    assert stats["s/demonstrations_dropped_prompt_fills_context"] == 1  # no response token left
    assert stats["s/examples"] == 2
    b = next(it)
    assert b["inputs_BL"].shape == (2, 20) and np.all(b["segment_ids_BL"][:, 0] == 1)
    cfg.overflow = "drop"
    stats = _it(cfg, "sft", seq_len=20).stats()
    assert stats["s/demonstrations_dropped_too_long"] == 2 and stats["s/examples"] == 1
    cfg.overflow = "split"
    with pytest.raises(ValueError, match="pretraining only"):
        _it(cfg, "sft", seq_len=20)


def test_to_python_decodes_tfds_values():
    assert sources._to_python({"a": b"x", "b": np.array([b"y", b"z"]), "c": np.int64(3)}) == {
        "a": "x",
        "b": ["y", "z"],
        "c": 3,
    }
