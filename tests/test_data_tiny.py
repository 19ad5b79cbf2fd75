"""The built-in tiny task: solutions, partial-credit gold reward, deterministic data, noisy demos."""

import random

import numpy as np
import pytest

from gptjax import data
from gptjax.data import tiny


@pytest.mark.parametrize(
    ("prompt", "answer"),
    [
        ("rev cadb=", "bdac"),
        ("sort cadb=", "abcd"),
        ("up cadb=", "CADB"),
        ("uniq aabccb=", "abc"),
        ("add 17 25=", "42"),
        ("max 3 8 1=", "8"),
    ],
)
def test_solve(prompt, answer):
    assert tiny.solve(prompt) == answer
    assert tiny.gold_reward(prompt, answer) == 1.0


def test_gold_reward_partial_credit():
    p = "rev abcd="  # answer dcba
    assert tiny.gold_reward(p, "dcbx") == pytest.approx(0.75)  # 3 of 4 characters right
    assert tiny.gold_reward(p, "dc") == pytest.approx(0.5)  # cut off
    assert tiny.gold_reward(p, "dcba ok") == pytest.approx(1 - 3 * 0.15)  # rambling past the answer
    assert tiny.gold_reward(p, "dcba", finished=False) == pytest.approx(0.7)  # never emitted EOS
    assert tiny.gold_reward(p, "abcd") == 0.0
    assert tiny.gold_reward(p, "") == 0.0
    assert tiny.gold_reward(p, "dcba" + "x" * 40) == 0.0  # clipped at 0
    for bad in ("hello", "rev abc", "pow 2 3=", "add x y="):
        with pytest.raises(ValueError, match="not a tiny-task prompt"):
            tiny.gold_reward(bad, "x")


def test_generation_is_deterministic_short_and_split_by_stage():
    a, b = tiny.sft_records(3, 200), tiny.sft_records(3, 200)
    assert a == b and a != tiny.sft_records(4, 200)
    assert tiny.eval_prompts(0, 50) == tiny.eval_prompts(0, 50)
    pools = {
        "eval": set(tiny.eval_prompts(0, 200)),
        "sft": {r["prompt"] for r in tiny.sft_records(0, 500)},
        "rm": {r["prompt"] for r in tiny.rank_records(0, 300)},
        "prompts": {r["prompt"] for r in tiny.prompt_records(0, 300)},
    }
    names = list(pools)
    for i, x in enumerate(names):
        for y in names[i + 1 :]:
            assert not pools[x] & pools[y], (x, y)
    text = "\n".join(r["text"] for r in tiny.text_records(0, 300))
    assert not any(p in text for p in pools["eval"])  # held-out prompts never appear in pretraining text
    lengths = [len(r["prompt"]) + len(r["response"]) for r in tiny.sft_records(0, 500)]
    assert max(lengths) < 40  # well under a 128-byte context
    assert {p.split(" ")[0] for p in pools["sft"]} == set(tiny.TASKS)


def test_demonstrations_are_noisy_so_sft_has_headroom():
    demos = tiny.sft_records(0, 2000, noise=0.3)
    gold = np.array([tiny.gold_reward(r["prompt"], r["response"]) for r in demos])
    assert 0.7 < gold.mean() < 0.9  # imitation tops out well below the best reward of 1.0
    assert 0.6 < (gold == 1.0).mean() < 0.8
    assert ((gold > 0) & (gold < 1)).mean() > 0.1  # partial credit is common


def test_labelers_follow_bradley_terry_on_gold_reward():
    recs = tiny.rank_records(0, 400, k=4, temperature=0.15)
    assert all(len(r["responses"]) == 4 and len(set(r["responses"])) == 4 for r in recs[:50])
    agree = total = 0
    for r in recs:
        g = [tiny.gold_reward(r["prompt"], x) for x in r["responses"]]
        for i in range(4):
            for j in range(i + 1, 4):
                if g[i] != g[j]:
                    total += 1
                    agree += g[i] > g[j]
    assert 0.8 < agree / total < 0.99  # mostly right, with labeler noise
    # Temperature 0 is a perfect labeler; K=2 pairs follow the Bradley-Terry probability.
    exact = tiny.rank_records(0, 100, k=3, temperature=0.0)
    for r in exact:
        g = [tiny.gold_reward(r["prompt"], x) for x in r["responses"]]
        assert g == sorted(g, reverse=True)
    rng = random.Random(0)
    p, good, bad = "rev abcd=", "dcba", "dcbx"  # gold 1.0 vs 0.75
    wins = np.mean([tiny.rank_by_labeler(rng, p, [bad, good], 0.25)[0] == good for _ in range(4000)])
    assert wins == pytest.approx(1 / (1 + np.exp(-0.25 / 0.25)), abs=0.03)


def test_tiny_config_per_stage_and_pretraining_text():
    for stage in ("pretrain", "sft", "rm", "prompts"):
        cfg = data.tiny_config(stage)
        assert list(cfg.sources.keys()) == ["tiny"] and cfg.sources.tiny.builtin == "tiny"
    with pytest.raises(ValueError, match="stage="):
        data.tiny_config("ppo")
    docs = tiny.text_records(0, 100)
    lines = [ln for d in docs for ln in d["text"].split("\n")]
    right = np.mean(
        [tiny.gold_reward(ln[: ln.index("=") + 1], ln[ln.index("=") + 1 :]) == 1.0 for ln in lines]
    )
    assert 0.85 < right < 0.97  # mostly correct worked examples, some mistakes


def test_labelling_a_policys_own_samples_for_iterated_rlhf():
    """Distinct samples ranked by the labeler (temperature 0: by gold reward); a prompt whose samples are all
    the same cannot be compared and is counted, not silently dropped."""
    prompts = tiny.rm_prompts(3, 3)
    assert len(set(prompts)) == 3 and all(tiny.bucket(p) == "rm" for p in prompts)
    assert not set(prompts) & set(tiny.eval_prompts(n=200))
    good = tiny.solve(prompts[0])
    samples = [[good[:-1], good, good[:-1], "zzz"], [good] * 4, ["a", "b", "a", "b"]]
    records, skipped = tiny.label_samples(0, prompts, samples, temperature=0.0)
    assert skipped == 1 and [r["prompt"] for r in records] == [prompts[0], prompts[2]]
    ranked = records[0]["responses"]
    assert sorted(ranked) == sorted({good[:-1], good, "zzz"})  # duplicates removed
    golds = [tiny.gold_reward(prompts[0], x) for x in ranked]
    assert ranked[0] == good and golds == sorted(golds, reverse=True)
