"""Cleaning with counts, exact and near dedup across sources, mixture rates, stage and eval splits."""

import collections
import json
import random

import numpy as np
import pytest

from gptjax import data
from gptjax.data import clean, pipeline


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _load(cfg, stage, split="train"):
    counts = collections.defaultdict(collections.Counter)
    return pipeline.load_records(cfg, stage, split, data.get_vocabulary(cfg), counts), counts


def _doc(rng, n=200):
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))) for _ in range(n)
    ]
    return " ".join(words)[:n]


def test_cleaning_steps_change_and_count(tmp_path):
    rows = [
        {"text": "ﬁne ｆｕｌｌ"},  # NFKC: ligature and full-width letters
        {"text": "bell\x07 and\x00 nul\r\nline"},  # control characters, CRLF
        {"text": "  lots   of\t\tspace  \n\n\n\nend  "},
        {"text": "ok"},  # too short
        {"text": "x" * 50},  # too long
        {"text": "plain text stays"},
    ]
    opts = {"unicode": "NFKC", "control_chars": True, "whitespace": True, "min_chars": 3, "max_chars": 40}
    cfg = data.default_config()
    cfg.sources.c = data.source(format="text", path=_write(tmp_path / "c.jsonl", rows), clean=opts)
    out, counts = _load(cfg, "pretrain")
    assert [r["text"] for r in out["c"]] == [
        "fine full",
        "bell and nul\nline",
        "lots of space\n\nend",
        "plain text stays",
    ]
    c = counts["c"]
    assert c["unicode_normalised"] == 1 and c["control_chars_removed"] == 1
    assert c["whitespace_cleaned"] == 1
    assert c["dropped_shorter_than_min_chars"] == 1 and c["dropped_longer_than_max_chars"] == 1
    assert c["records_read"] == 6
    assert clean.strip_control("tab\tkeeps\nnew\x1bline") == "tab\tkeeps\nnewline"


def test_dedup_removes_planted_duplicates_across_sources_and_nothing_else(tmp_path):
    rng = random.Random(0)
    base = [_doc(rng) for _ in range(60)]
    near = []
    for d in base[:10]:  # a couple of characters changed: near-duplicates
        i = rng.randrange(20, 180)
        near.append(d[:i] + "ZZ" + d[i + 2 :])
    # Same vocabulary, different text: similar in style but not duplicates; must survive.
    a_rows = [{"text": d} for d in base[:40]] + [
        {"text": base[0]},
        {"text": base[1]},
    ]  # 2 exact dups inside a
    b_rows = [{"text": d} for d in base[40:]] + [{"text": base[5]}] + [{"text": d} for d in near]
    sw = {"dedup": True, "near_dup": True}
    cfg = data.default_config()
    cfg.sources.a = data.source(format="text", path=_write(tmp_path / "a.jsonl", a_rows), clean=sw)
    cfg.sources.b = data.source(format="text", path=_write(tmp_path / "b.jsonl", b_rows), clean=sw)
    out, counts = _load(cfg, "pretrain")
    assert [r["text"] for r in out["a"]] == base[:40]
    assert [r["text"] for r in out["b"]] == base[40:]  # the cross-source copy and all near-copies are gone
    assert counts["a"]["dedup_exact_removed"] == 2
    assert counts["b"]["dedup_exact_removed"] == 1 and counts["b"]["dedup_near_removed"] == 10
    # Per source only: b's copies of a's documents stay, except the near-copy of base[5] that b holds itself.
    cfg.dedup_across_sources = False
    out, counts = _load(cfg, "pretrain")
    assert len(out["b"]) == 20 + 1 + 9 and counts["b"]["dedup_near_removed"] == 1
    # Switched off: nothing removed.
    cfg.sources.a.clean.dedup = cfg.sources.a.clean.near_dup = False
    out, _ = _load(cfg, "pretrain")
    assert len(out["a"]) == 42


def test_minhash_estimates_jaccard():
    rng = random.Random(1)
    x, y = _doc(rng, 300), _doc(rng, 300)
    a = np.random.default_rng(0).integers(1, clean._PRIME, 256, dtype=np.uint64)
    b = np.random.default_rng(1).integers(0, clean._PRIME, 256, dtype=np.uint64)
    sx, sy = clean.shingles(x, 5), clean.shingles(x[:150] + y[150:], 5)
    est = np.mean(clean.minhash(sx, a, b) == clean.minhash(sy, a, b))
    assert est == pytest.approx(clean.jaccard(sx, sy), abs=0.1)


def test_mixture_rates_hold_within_sampling_error(tmp_path):
    cfg = data.default_config()
    for name in ("a", "b", "c"):
        cfg.sources[name] = data.source(
            format="prompt",
            path=_write(tmp_path / f"{name}.jsonl", [{"prompt": f"{name}{i}"} for i in range(50)]),
        )
    cfg.mixture = "a:3,b:1"  # one line: blend a and b 3:1, leave c out
    it = data.make_iterator(
        cfg, stage="prompts", batch_size=400, seq_len=8, seed=0, shard_index=0, num_shards=1
    )
    names = [t[0] for _ in range(5) for t in it.prompt_text(next(it)["prompt_ids_B"])]
    frac = np.mean([n == "a" for n in names])
    assert "c" not in names
    assert abs(frac - 0.75) < 4 * np.sqrt(0.75 * 0.25 / len(names))  # within 4 sigma of 2000 draws
    cfg.mixture = ""
    cfg.sources.c.rate = 2.0  # otherwise each source's own rate: a, b, c = 1 : 1 : 2
    it = data.make_iterator(
        cfg, stage="prompts", batch_size=400, seq_len=8, seed=0, shard_index=0, num_shards=1
    )
    counts = collections.Counter(t[0] for _ in range(5) for t in it.prompt_text(next(it)["prompt_ids_B"]))
    assert abs(counts["c"] / 2000 - 0.5) < 4 * np.sqrt(0.25 / 2000)


def test_stage_split_is_disjoint_and_covers_the_source(tmp_path):
    rows = [{"prompt": f"question {i}", "responses": [f"good {i}", f"bad {i}"]} for i in range(400)]
    cfg = data.default_config()
    cfg.sources.r = data.source(
        format="rank", path=_write(tmp_path / "r.jsonl", rows), stage_split="sft:0.5,rm:0.3,prompts:0.2"
    )
    got = {stage: {r["prompt"] for r in _load(cfg, stage)[0]["r"]} for stage in ("sft", "rm", "prompts")}
    assert not got["sft"] & got["rm"] and not got["sft"] & got["prompts"] and not got["rm"] & got["prompts"]
    assert set.union(*got.values()) == {r["prompt"] for r in rows}
    for stage, share in (("sft", 0.5), ("rm", 0.3), ("prompts", 0.2)):
        assert abs(len(got[stage]) / 400 - share) < 0.08
    it = data.make_iterator(cfg, stage="sft", batch_size=2, seq_len=32, seed=0, shard_index=0, num_shards=1)
    assert it.stats()["r/stage_split_other_stages_excluded"] == 400 - len(got["sft"])
    cfg.sources.r.stage_split = "sft:0.7,rm:0.7"
    with pytest.raises(ValueError, match=r"data.sources.r.stage_split=.*add up to more than 1"):
        data.make_iterator(cfg, stage="sft", batch_size=2, seq_len=32, seed=0, shard_index=0, num_shards=1)


def test_validation_fraction_carves_a_disjoint_held_out_set(tmp_path):
    cfg = data.default_config()
    cfg.sources.p = data.source(
        format="prompt", path=_write(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(300)])
    )
    with pytest.raises(ValueError, match="no source has validation data"):
        _load(cfg, "prompts", "validation")
    cfg.validation_fraction = 0.1
    train = {r["prompt"] for r in _load(cfg, "prompts")[0]["p"]}
    val, _counts = _load(cfg, "prompts", "validation")
    val = {r["prompt"] for r in val["p"]}
    assert not train & val and len(train | val) == 300 and 10 < len(val) < 55
    it = data.make_iterator(
        cfg,
        stage="prompts",
        batch_size=len(val),
        seq_len=8,
        seed=0,
        split="validation",
        shard_index=0,
        num_shards=1,
    )
    assert set(it.prompt_text(next(it)["prompt_ids_B"])) == val
