"""Batch formats as units: each unit's declared shapes are those of the batches the pipeline makes with it,
the tables derived from the units say what they said before, and an unknown format fails naming itself."""

import collections
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gptjax import data
from gptjax.data import config as config_lib
from gptjax.data import formats, pipeline, readers, sources
from gptjax.data.formats import fields


def _tiny(stage, **data_kw):
    cfg = data.tiny_config(stage)
    cfg.tiny.update(dict(num_docs=120, num_sft=120, num_rank=80, num_prompts=80, num_eval=20))
    cfg.update(data_kw)
    return cfg


def _batch_shapes(batch):
    return {k: (v.shape, v.dtype) for k, v in batch.items()}


def _unit_shapes(fmt, B, L, cfg):
    return {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in fmt.shapes(B, L, cfg).items()}


@pytest.mark.parametrize(
    "name, data_kw, seq_len",
    [
        ("pretrain", {}, 48),
        ("sft", {"pack": False}, 48),
        ("rm", {"num_responses": 3}, 40),  # K below the records' 4: the rest are cut, the shape is K
        ("prompts", {"pad_side": "left"}, 16),  # seq_len is the prompt length P
    ],
)
def test_unit_shapes_are_the_pipelines_batch_shapes(name, data_kw, seq_len):
    cfg = _tiny(name, **data_kw)
    fmt = formats.get(name)
    it = data.make_iterator(
        cfg, stage=name, batch_size=3, seq_len=seq_len, seed=0, shard_index=0, num_shards=1
    )
    assert it.format is fmt
    expected = _unit_shapes(fmt, 3, seq_len, cfg)
    for _ in range(2):
        assert _batch_shapes(next(it)) == expected


def test_rm_shapes_need_k_named():
    with pytest.raises(ValueError, match="num_responses must name K"):
        formats.get("rm").shapes(2, 32, _tiny("rm"))


def test_unknown_format_names_itself_and_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown data format 'ppo'.*'pretrain', 'sft', 'rm', 'prompts'"):
        formats.get("ppo")
    with pytest.raises(ValueError, match="stage='ppo'"):
        data.make_iterator(
            _tiny("sft"), stage="ppo", batch_size=2, seq_len=32, seed=0, shard_index=0, num_shards=1
        )


def test_tables_derived_from_the_units():
    assert config_lib.STAGES == ("pretrain", "sft", "rm", "prompts")
    assert config_lib.FORMATS == ("text", "sft", "rank", "prompt")
    assert config_lib.STAGE_FORMATS == {
        "pretrain": ("text",),
        "sft": ("sft", "rank"),
        "rm": ("rank",),
        "prompts": ("prompt", "sft", "rank"),
    }
    assert config_lib.OVERFLOW == ("auto", "truncate", "drop", "split")
    for name in formats.NAMES:
        fmt = formats.get(name)
        assert fmt.name == name and formats.of_record(fmt.record) is fmt
    assert formats.of_record("pairs") is None
    # a ranking feeds SFT its best response and RL its prompt
    ranking = {"prompt": "p", "responses": ["best", "worse"]}
    assert formats.get("sft").convert(ranking, "rank") == {"prompt": "p", "response": "best"}
    assert formats.get("prompts").convert(ranking, "rank") == {"prompt": "p"}
    assert formats.get("pretrain").overflow_policy("auto") == "split"
    with pytest.raises(ValueError, match="'split' is for pretraining only, not stage 'rm'"):
        formats.get("rm").overflow_policy("split")


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_planner_takes_a_data_stage_batch_from_its_format(stage):
    from gptjax.model import sharding
    from gptjax.research import plan as plan_lib
    from gptjax.train import defaults

    c = defaults.load_config(f"configs/tiny.py:stage={stage}")
    c.unlock()
    c.data.num_responses = 2
    batch = plan_lib.abstract_batch(c, stage, sharding.make_mesh(c.mesh))
    B, L = c.train.batch_size, c.train.seq_len
    fmt = formats.get("sft" if stage == "sft" else "rm")
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()} == _unit_shapes(fmt, B, L, c.data)


# ----------------------------------------------------------------------------------------------------
# TRL's dataset forms (standard / conversational, explicit / implicit prompt), read per record and logged


def _chat(messages, add_generation_prompt=True):
    """A stand-in chat template that shows which messages were rendered and whether it ended in a turn."""
    return "".join(f"<{m['role']}>{m['content']}" for m in messages) + (
        "<assistant>" if add_generation_prompt else ""
    )


def _parse(rec, fmt, counts=None, where="d.jsonl:7", **names):
    counts = collections.Counter() if counts is None else counts
    return sources.parse_record(rec, fmt, config_lib.fields_config(**names), where, _chat, counts)


U1, A1, U2 = (
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "2+2?"},
)
SYS = {"role": "system", "content": "brief"}


def _a(text):
    return [{"role": "assistant", "content": text}]


def test_sft_reads_trl_forms_and_counts_and_logs_each_form_once(caplog):
    counts = collections.Counter()
    cases = [
        ({"prompt": "2+2=", "completion": "4"}, {"prompt": "2+2=", "response": "4"}, "prompt_completion"),
        ({"prompt": "2+2=", "response": "4"}, {"prompt": "2+2=", "response": "4"}, "prompt_completion"),
        (
            {"prompt": [SYS, U2], "completion": _a("4")},
            {"prompt": "<system>brief<user>2+2?<assistant>", "response": "4"},
            "conversational_prompt_completion",
        ),
        (
            {"messages": [U1, A1, U2, *_a("4")]},
            {"prompt": "<user>hi<assistant>yo<user>2+2?<assistant>", "response": "4"},
            "messages",
        ),
    ]
    with caplog.at_level(logging.INFO):
        for rec, want, _ in cases + cases:
            assert _parse(rec, "sft", counts) == want
    assert counts == {
        "sft_form_prompt_completion": 4,
        "sft_form_conversational_prompt_completion": 2,
        "sft_form_messages": 2,
    }
    said = [r.getMessage() for r in caplog.records if "records in form" in r.getMessage()]
    assert len(said) == 3 and all(m.startswith("data d.jsonl:7: sft records in form") for m in said)
    # a response field the source names is the only one read: TRL's name stands in for the default only
    assert (
        _parse({"q": "a", "completion": "x", "ans": "y"}, "sft", prompt="q", response="ans")["response"]
        == "y"
    )
    with pytest.raises(ValueError, match=r"d\.jsonl:7: missing field 'ans'"):
        _parse({"q": "a", "completion": "x"}, "sft", prompt="q", response="ans")


def test_preferences_read_trl_explicit_and_implicit_prompt_forms():
    counts = collections.Counter()
    cases = [
        ({"prompt": "Q:", "chosen": " yes", "rejected": " no"}, "Q:", [" yes", " no"], "explicit_prompt"),
        (  # TRL's conversational explicit prompt
            {"prompt": [SYS, U2], "chosen": _a("4"), "rejected": _a("5")},
            "<system>brief<user>2+2?<assistant>",
            ["4", "5"],
            "conversational_explicit_prompt",
        ),
        (  # implicit: whole conversations sharing their first messages (a multi-turn prompt)
            {"chosen": [U1, A1, U2, *_a("4")], "rejected": [U1, A1, U2, *_a("five")]},
            "<user>hi<assistant>yo<user>2+2?<assistant>",
            ["4", "five"],
            "conversational_implicit_prompt",
        ),
        (  # UltraFeedback's layout: a prompt string beside whole conversations; TRL reads the conversations
            {"prompt": "2+2?", "chosen": [U2, *_a("4")], "rejected": [U2, *_a("5")]},
            "<user>2+2?<assistant>",
            ["4", "5"],
            "conversational_implicit_prompt",
        ),
        (  # implicit text: the shared beginning up to a word break; the space starts the responses
            {
                "chosen": "Human: 2+2?\n\nAssistant: Four, surely",
                "rejected": "Human: 2+2?\n\nAssistant: Five",
            },
            "Human: 2+2?\n\nAssistant:",
            [" Four, surely", " Five"],
            "implicit_prompt",
        ),
        ({"chosen": "Q:\nyes", "rejected": "Q:\nyeah"}, "Q:\n", ["yes", "yeah"], "implicit_prompt"),
        ({"chosen": "abc", "rejected": "abd"}, "", ["abc", "abd"], "implicit_prompt"),
    ]
    for rec, prompt, responses, form in cases:
        assert _parse(rec, "rank", counts) == {"prompt": prompt, "responses": responses}, rec
        assert counts[f"rank_form_{form}"] >= 1
    assert _parse({"prompt": "p", "responses": ["a", "b"]}, "rank", counts)["responses"] == ["a", "b"]
    assert counts["rank_form_ranked"] == 1 and counts["rank_form_implicit_prompt"] == 3
    # identical conversations or texts are a tie: dropped and counted, as before
    assert _parse({"chosen": [U2, *_a("4")], "rejected": [U2, *_a("4")]}, "rank", counts) is None
    assert _parse({"chosen": "same", "rejected": "same"}, "rank", counts) is None
    assert counts["rank_records_dropped_ties"] == 2
    # an implicit-prompt ranking feeds SFT and RL like any other
    rec = _parse(cases[2][0], "rank")
    assert formats.get("sft").convert(rec, "rank")["response"] == "4"
    assert formats.get("prompts").convert(rec, "rank") == {"prompt": cases[2][1]}


@pytest.mark.parametrize(
    "rec, match",
    [
        (
            {"chosen": [U2, *_a("4")], "rejected": "5"},
            r"d\.jsonl:7: fields 'chosen' and 'rejected' must both be",
        ),
        (
            {"chosen": [U1, *_a("yo"), U2, *_a("4")], "rejected": [U1, *_a("hey"), U2, *_a("4")]},
            r"d\.jsonl:7: .*share their first 1 message.*'chosen' has roles "
            r"\['assistant', 'user', 'assistant'\]",
        ),
        (
            {"chosen": _a("4"), "rejected": _a("5")},
            r"d\.jsonl:7: .*share no first messages.*no 'prompt' field",
        ),
        (
            {"prompt": "p", "chosen": [U2, A1], "rejected": _a("5")},
            r"d\.jsonl:7: field 'chosen' must hold one assistant",
        ),
        ({"prompt": "p", "chosen": "4"}, r"d\.jsonl:7: missing field 'rejected'"),
        (
            {"prompt": [{"role": "user"}], "chosen": "4", "rejected": "5"},
            r"d\.jsonl:7: field 'prompt'\[0\] must have",
        ),
        (
            {"prompt": 3, "chosen": "4", "rejected": "5"},
            r"d\.jsonl:7: field 'prompt' must be a string, got int",
        ),
    ],
)
def test_bad_preference_records_name_file_line_and_field(rec, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _parse(rec, "rank")


def test_sft_and_prompt_errors_name_file_line_and_field():
    with pytest.raises(ValueError, match=r"d\.jsonl:7: missing field 'response'"):
        _parse({"prompt": "p"}, "sft")
    with pytest.raises(ValueError, match=r"d\.jsonl:7: field 'completion' must hold one assistant message"):
        _parse({"prompt": [U2], "completion": [U1, A1]}, "sft")
    with pytest.raises(ValueError, match=r"d\.jsonl:7: field 'prompt' must be a non-empty list"):
        _parse({"prompt": [], "completion": "x"}, "sft")


def test_prompts_read_strings_and_message_lists():
    f = config_lib.fields_config()
    counts = collections.Counter()
    assert _parse({"prompt": [SYS, U2]}, "prompt") == {"prompt": "<system>brief<user>2+2?<assistant>"}
    assert _parse({"messages": [U2]}, "prompt") == {"prompt": "<user>2+2?<assistant>"}
    for rec in ({"prompt": "go"}, {"prompt": [U2]}, {"prompt": [U1]}):
        fields.prompt(rec, f, "p.jsonl:1", "prompt", _chat, counts)
    assert counts == {"prompt_form_prompt": 1, "prompt_form_conversational_prompt": 2}


def test_trl_forms_through_the_pipeline_with_their_counts(tmp_path):
    rows = [
        {"chosen": [U2, *_a("4")], "rejected": [U2, *_a("5")]},
        {"prompt": "Q:", "chosen": " yes", "rejected": " no"},
        {"chosen": "Q: a", "rejected": "Q: b"},
    ]
    (tmp_path / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = data.default_config()
    cfg.sources.pref = data.source(format="rank", path=str(tmp_path / "pref.jsonl"))
    counts = collections.defaultdict(collections.Counter)
    out = pipeline.load_records(cfg, "rm", "train", data.get_vocabulary(cfg), counts)
    assert out["pref"] == [
        {"prompt": "user: 2+2?\nassistant: ", "responses": ["4", "5"]},
        {"prompt": "Q:", "responses": [" yes", " no"]},
        {"prompt": "Q:", "responses": [" a", " b"]},
    ]
    assert {k: v for k, v in counts["pref"].items() if "_form_" in k} == {
        "rank_form_conversational_implicit_prompt": 1,
        "rank_form_explicit_prompt": 1,
        "rank_form_implicit_prompt": 1,
    }
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps(rows[1]) + "\n" + json.dumps({"chosen": [U2, *_a("4")], "rejected": "5"}) + "\n"
    )
    cfg.sources.pref.path = str(bad)
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: fields 'chosen' and 'rejected' must both be"):
        pipeline.load_records(cfg, "rm", "train", data.get_vocabulary(cfg), counts)


# ----------------------------------------------------------------------------------------------------
# Table sources: Parquet files and saved `datasets` directories (gptjax.data.readers)

CHAT_ROWS = [
    {
        "prompt": [{"role": "user", "content": f"q{i}", "name": None if i % 2 else "ann"}],
        "completion": _a(f"a{i}"),
    }
    for i in range(5)
]


def _save_dataset(path, rows, shards=1):
    """A directory as `datasets`' Dataset.save_to_disk lays it out: Arrow stream shards and state.json."""
    path.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    names, step = [], -(-len(rows) // shards)
    for k in range(shards):
        names.append(f"data-{k:05d}-of-{shards:05d}.arrow")
        with pa.OSFile(str(path / names[-1]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table.slice(k * step, step))
    (path / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": n} for n in names], "_split": None})
    )
    (path / "dataset_info.json").write_text("{}")
    return str(path)


def _sft(rows):
    counts = collections.Counter()
    out = [sources.parse_record(r, "sft", config_lib.fields_config(), w, _chat, counts) for w, r in rows]
    return out, counts


def test_parquet_rows_read_as_records_with_their_row_numbers(tmp_path):
    path = str(tmp_path / "chat.parquet")
    pq.write_table(pa.Table.from_pylist(CHAT_ROWS), path, row_group_size=2)
    assert readers.handles(path) and not readers.handles(str(tmp_path / "x.jsonl"))
    rows = list(readers.rows(path))
    assert [w for w, _ in rows] == [f"{path} row {i}" for i in range(5)]
    out, counts = _sft(rows)
    assert out[3] == {"prompt": "<user>q3<assistant>", "response": "a3"}
    assert counts == {"sft_form_conversational_prompt_completion": 5}
    # a message's column that is null in this row is absent, as transformers leaves it for the template
    assert fields.messages(rows[1][1], "prompt", rows[1][0]) == [{"role": "user", "content": "q1"}]
    assert fields.messages(rows[0][1], "prompt", rows[0][0])[0]["name"] == "ann"
    bad = [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None}]
    pq.write_table(pa.Table.from_pylist(bad), str(tmp_path / "bad.parquet"))
    with pytest.raises(
        TypeError, match=r"bad\.parquet row 1: field 'completion' must be a string, got NoneType"
    ):
        _sft(readers.rows(str(tmp_path / "bad.parquet")))
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"broken\.parquet: not a readable Parquet file"):
        list(readers.rows(str(tmp_path / "broken.parquet")))
    pq.write_table(pa.Table.from_pylist(CHAT_ROWS).slice(0, 0), str(tmp_path / "empty.parquet"))
    with pytest.raises(ValueError, match=r"empty\.parquet: no rows"):
        list(readers.rows(str(tmp_path / "empty.parquet")))


def test_saved_datasets_directories_dataset_and_dataset_dict(tmp_path):
    one = _save_dataset(tmp_path / "one", CHAT_ROWS, shards=2)
    assert readers.handles(one)
    rows = list(readers.rows(one, "ignored: a single Dataset has no splits"))
    assert [w for w, _ in rows] == [f"{one} row {i}" for i in range(5)]  # shards in order, one numbering
    assert [r["completion"][0]["content"] for _, r in rows] == [f"a{i}" for i in range(5)]
    both = tmp_path / "both"
    _save_dataset(both / "train", CHAT_ROWS[:3])
    _save_dataset(both / "test", CHAT_ROWS[3:])
    (both / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert readers.handles(str(both))
    held_out = list(readers.rows(str(both), "test"))
    assert [w for w, _ in held_out] == [f"{both}[test] row 0", f"{both}[test] row 1"]
    assert _sft(held_out)[0][1] == {"prompt": "<user>q4<assistant>", "response": "a4"}
    assert len(list(readers.rows(str(both), "train"))) == 3
    with pytest.raises(
        ValueError, match=r"both: a datasets DatasetDict with splits \['train', 'test'\] and no 'dev'"
    ):
        list(readers.rows(str(both), "dev"))
    (tmp_path / "one" / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists data-00001-of-00002\.arrow, which is missing"):
        list(readers.rows(one))


def test_real_datasets_save_to_disk_reads_the_same(tmp_path):
    datasets = pytest.importorskip("datasets")  # the layout above was taken from datasets' own writer
    ds = datasets.Dataset.from_list(CHAT_ROWS)
    ds.shuffle(seed=1).save_to_disk(str(tmp_path / "one"), num_shards=2)
    got = [r for _, r in readers.rows(str(tmp_path / "one"))]
    assert got == list(ds.shuffle(seed=1))
    datasets.DatasetDict(train=ds, test=ds.select([4])).save_to_disk(str(tmp_path / "both"))
    assert [r for _, r in readers.rows(str(tmp_path / "both"), "test")] == [ds[4]]
