"""make_iterator on the tiny task: batch layout per stage, packing, determinism, sharding and exact resume."""

import json

import numpy as np
import pytest

from gptjax import data
from gptjax.data import tiny


def _small_tiny(stage, **tiny_kw):
    cfg = data.tiny_config(stage)
    cfg.tiny.update(dict(num_docs=300, num_sft=300, num_rank=200, num_prompts=200, num_eval=40, **tiny_kw))
    return cfg


def _it(cfg, stage, **kw):
    kw = {"batch_size": 4, "seq_len": 64, "seed": 0, "shard_index": 0, "num_shards": 1, **kw}
    return data.make_iterator(cfg, stage=stage, **kw)


def _check_lm_batch(b, L):
    inputs, targets, w = b["inputs_BL"], b["targets_BL"], b["weights_BL"]
    segs, pos = b["segment_ids_BL"], b["positions_BL"]
    assert inputs.dtype == targets.dtype == segs.dtype == pos.dtype == np.int32 and w.dtype == np.float32
    for row in range(inputs.shape[0]):
        for s in set(segs[row].tolist()) - {0}:
            idx = np.flatnonzero(segs[row] == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "a segment must be contiguous"
            np.testing.assert_array_equal(pos[row, idx], np.arange(len(idx)))
            # targets are the next input within the same segment; the last token trains on nothing
            np.testing.assert_array_equal(targets[row, idx[:-1]], inputs[row, idx[1:]])
            assert w[row, idx[-1]] == 0
        pad = segs[row] == 0
        assert np.all(w[row, pad] == 0) and np.all(pos[row, pad] == 0)
        assert np.all(segs[row, : np.argmax(pad)] > 0) if pad.any() else True  # padding only at the end
        assert np.all(np.diff(segs[row][~pad]) >= 0)


def test_pretrain_batches_pack_documents_without_crossing():
    cfg = _small_tiny("pretrain")
    it = _it(cfg, "pretrain")
    vocab = data.get_vocabulary(cfg)
    assert vocab.vocab_size == 259 and (vocab.pad_id, vocab.bos_id, vocab.eos_id) == (256, 257, 258)
    pieces = []
    for _ in range(6):
        b = next(it)
        assert b["inputs_BL"].shape == (4, 64)
        _check_lm_batch(b, 64)
        for row in range(4):
            segs = b["segment_ids_BL"][row]
            for s in range(1, segs.max() + 1):
                pieces.append(b["inputs_BL"][row, segs == s].tolist())
    # Rejoining split pieces (a continuation repeats the previous piece's last token) gives whole documents,
    # each BOS text EOS with exactly one BOS: no segment holds two documents.
    docs, cur = [], []
    for p in pieces:
        cur = p if not cur else cur + p[1:]
        if p[-1] == vocab.eos_id:
            docs.append(cur)
            cur = []
    texts = {r["text"] for r in tiny.text_records(0, 300, 0.1)}
    assert len(docs) >= 10
    for d in docs:
        assert d[0] == vocab.bos_id and d.count(vocab.bos_id) == 1 and d.count(vocab.eos_id) == 1
        assert vocab.decode(d) in texts
    assert max(len(d) for d in docs) > 0


def test_sft_weights_only_on_response_and_eos():
    cfg = _small_tiny("sft")
    it = _it(cfg, "sft")
    vocab = data.get_vocabulary(cfg)
    demos = {r["prompt"]: r["response"] for r in tiny.sft_records(0, 300, 0.3)}
    b = next(it)
    _check_lm_batch(b, 64)
    n = 0
    for row in range(4):
        segs = b["segment_ids_BL"][row]
        for s in range(1, segs.max() + 1):
            toks, tg, w = (b[k][row, segs == s] for k in ("inputs_BL", "targets_BL", "weights_BL"))
            text = vocab.decode(toks)
            prompt = text[: text.index("=") + 1]
            assert demos[prompt] == text[len(prompt) :]
            trained = tg[w > 0].tolist()
            assert trained == vocab.encode(demos[prompt]) + [vocab.eos_id]  # response + EOS, never the prompt
            n += 1
    assert n >= 8  # several demonstrations packed per row


def test_rm_batches_best_to_worst_and_prompts_round_trip():
    cfg = _small_tiny("rm")
    it = _it(cfg, "rm", seq_len=48)
    vocab = data.get_vocabulary(cfg)
    b = next(it)
    assert b["tokens_BKL"].shape == (4, 4, 48) and b["valid_BK"].dtype == bool
    for i in range(4):
        for k in range(4):
            n, p = b["lengths_BK"][i, k], b["prompt_lengths_BK"][i, k]
            toks = b["tokens_BKL"][i, k]
            assert toks[n - 1] == vocab.eos_id and np.all(toks[n:] == vocab.pad_id)
            assert vocab.decode(toks[:p]).endswith("=")
    # The labelers are noisy but mostly right: best beats worst on gold reward most of the time.
    wins = []
    for _ in range(10):
        b = next(it)
        for i in range(4):
            texts = [vocab.decode(b["tokens_BKL"][i, k]) for k in range(4)]
            prompt = texts[0][: texts[0].index("=") + 1]
            g = [tiny.gold_reward(prompt, t[len(prompt) :]) for t in texts]
            wins.append(g[0] >= g[-1])
    assert np.mean(wins) > 0.8

    cfg = _small_tiny("prompts")
    it = _it(cfg, "prompts", seq_len=24)
    b = next(it)
    assert b["prompt_BP"].shape == (4, 24)
    for i, text in enumerate(it.prompt_text(b["prompt_ids_B"])):
        n = b["prompt_lengths_B"][i]
        assert vocab.decode(b["prompt_BP"][i, :n]) == text and b["prompt_BP"][i, 0] == vocab.bos_id
        tiny.solve(text)  # a real tiny-task prompt
    cfg.pad_side = "left"
    b = next(_it(cfg, "prompts", seq_len=24))
    n = b["prompt_lengths_B"][0]
    assert b["prompt_BP"][0, 24 - n] == vocab.bos_id and np.all(b["prompt_BP"][0, : 24 - n] == vocab.pad_id)


@pytest.mark.parametrize("stage", ["pretrain", "sft", "rm"])
def test_resume_yields_the_same_next_batches(stage):
    cfg = _small_tiny(stage)
    it = _it(cfg, stage, batch_size=3, seq_len=40)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    resumed = _it(cfg, stage, batch_size=3, seq_len=40)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    # Same seed -> same stream; another seed -> another one.
    a, b = next(_it(cfg, stage, seed=1)), next(_it(cfg, stage, seed=1))
    c = next(_it(cfg, stage, seed=2))
    key = "tokens_BKL" if stage == "rm" else "inputs_BL"
    np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a[key], c[key])
    with pytest.raises(ValueError, match="seed"):
        _it(cfg, stage, seed=5).set_state(state)


def test_hosts_see_disjoint_shards_and_validation_is_held_out():
    cfg = _small_tiny("prompts")
    seen = []
    for shard in range(2):
        it = _it(cfg, "prompts", batch_size=50, seq_len=24, shard_index=shard, num_shards=2)
        seen.append(set(it.prompt_text(next(it)["prompt_ids_B"])))
    assert len(seen[0]) == len(seen[1]) == 50 and not seen[0] & seen[1]
    ev = _it(cfg, "prompts", batch_size=40, seq_len=24, split="validation")
    first, second = next(ev), next(ev)
    held = ev.prompt_text(first["prompt_ids_B"])
    assert held == ev.prompt_text(second["prompt_ids_B"]) == tiny.eval_prompts(0, 40)  # fixed order, loops
    train = {r["prompt"] for r in tiny.prompt_records(0, 200)} | {
        r["prompt"] for r in tiny.sft_records(0, 300)
    }
    assert not set(held) & train


def test_epochs_are_full_permutations_and_resume_across_them():
    cfg = _small_tiny("prompts")
    cfg.tiny.num_prompts = 12
    it = _it(cfg, "prompts", batch_size=4, seq_len=24)
    epochs = [[int(i) for _ in range(3) for i in next(it)["prompt_ids_B"]] for _ in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs)  # each example exactly once per epoch
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    it = _it(cfg, "prompts", batch_size=5, seq_len=24)
    next(it), next(it), next(it)
    state = it.get_state()
    want = next(it)["prompt_ids_B"]
    resumed = _it(cfg, "prompts", batch_size=5, seq_len=24)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["prompt_ids_B"], want)


def test_unpacked_rows_hold_one_document_and_long_documents_split():
    cfg = _small_tiny("sft")
    cfg.pack = False
    b = next(_it(cfg, "sft"))
    _check_lm_batch(b, 64)
    assert b["segment_ids_BL"].max() == 1 and np.all(b["segment_ids_BL"][:, 0] == 1)
    # Pretraining documents longer than a row continue in the next row, re-reading one token: no target lost.
    cfg = _small_tiny("pretrain")
    it = _it(cfg, "pretrain", batch_size=1, seq_len=16)
    rows = [next(it) for _ in range(4)]
    first, second = rows[0]["inputs_BL"][0], rows[1]["inputs_BL"][0]
    assert rows[0]["segment_ids_BL"][0].min() == 1  # the row is full
    assert second[0] == first[-1] and rows[1]["positions_BL"][0, 0] == 0
    assert rows[0]["weights_BL"][0, -1] == 0 and rows[1]["targets_BL"][0, 0] == second[1]
