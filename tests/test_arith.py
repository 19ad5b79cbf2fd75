"""The built-in arithmetic task (problems, checker, reward functions, splits) and prompt records' other fields
(``it.prompt_fields``) through the data pipeline."""

import json
import random

import ml_collections
import numpy as np
import pytest

from gptjax import data
from gptjax.data import arith, formats
from gptjax.data.config import arith_section, fields_config


def test_problems_solutions_and_their_bounds():
    assert arith.solve("Q: 7+2-5+3 A:") == 7
    assert arith.steps("Q: 7+2-5+3 A:") == [(7, "+", 2, 9), (9, "-", 5, 4), (4, "+", 3, 7)]
    assert arith.solution("Q: 7+2-5+3 A:") == " 7+2=9 9-5=4 4+3=7 => 7"
    assert arith.solution("Q: 9-0-9 A:") == " 9-0=9 9-9=0 => 0"  # '-0' stays a subtraction
    assert arith.solution("Q: 12+30-8 A:") == " 12+30=42 42-8=34 => 34"  # any numbers parse
    for bad in ("7+2", "Q: 7+2 A", "Q: 7*2 A:", "Q: 7 A:", "Q: a+b A:"):
        with pytest.raises(ValueError, match="not an arithmetic-task prompt"):
            arith.solve(bad)
    rng = random.Random(0)
    assert [arith.make_prompt(random.Random(1)) for _ in range(2)] == ["Q: 2+4+1 A:"] * 2  # seeded
    for _ in range(500):
        p = arith.make_prompt(rng, max_value=9, terms=(3, 4))
        assert arith.final_answer(arith.solution(p)) == arith.solve(p)
        work = arith.steps(p)
        assert len(work) in (2, 3)
        assert all(0 <= v <= 9 for a, _, b, c in work for v in (a, b, c)), p


@pytest.mark.parametrize(
    ("response", "right"),
    [
        (" 7+2=9 9-5=4 4+3=7 => 7", True),
        ("=> 7", True),  # the steps are not graded
        (" 7+2=9 => 7 \n", True),  # whitespace after the answer
        ("=>7", True),
        (" 7+2=9 9-5=4 4+3=7 => 8", False),  # wrong
        (" 7+2=9 9-5=4 4+3=7", False),  # no final form
        ("=> 7 ok", False),  # text after the answer
        ("=> 7 => 8", False),  # the last final form counts
        ("=> 7.0", False),
        ("=> seven", False),
        ("", False),
    ],
)
def test_check(response, right):
    p = "Q: 7+2-5+3 A:"
    assert arith.check(p, response, "7") is right
    assert arith.check(p, response, 7) is right  # an int answer too
    assert arith.gold_reward(p, response) == float(right)
    assert arith.gold_reward(p, response, finished=False) == 0.0  # cut off at the token limit


def test_final_answer_parses_negative_and_refuses_a_bad_answer():
    assert arith.final_answer(" 2-5=-3 => -3") == -3
    assert arith.final_answer("=> 12") == 12 and arith.final_answer("=> ") is None
    assert not arith.check("Q: 1+1 A:", "=> 2", "two")  # an answer that is no integer never matches


def test_reward_functions():
    prompts = ["Q: 1+2 A:", "Q: 5-3 A:", "Q: 4+4 A:", "Q: 9-9 A:", "Q: 1+1 A:"]
    responses = ["=> 3", " 5-3=2 => 2", " 4+4=8 => 9", " 9-9=0", "=> 2"]
    answer = ["3", "2", "8", "0", None]  # the last row's record has no answer (another task's prompt)
    assert arith.verified_reward(prompts, responses, answer=answer, other=[0] * 5) == [
        1.0,
        1.0,
        0.0,
        0.0,
        0.0,
    ]
    assert arith.format_reward(prompts, responses, answer=answer) == [1.0, 1.0, 1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="'answer' field"):
        arith.verified_reward(prompts, responses)
    with pytest.raises(ValueError, match="5 prompts, 5 responses, 2 answers"):
        arith.verified_reward(prompts, responses, answer=answer[:2])


def test_splits_are_disjoint_and_held_out_problems_are_never_trained_on():
    cfg = arith_section(num_docs=2000, num_sft=200, num_prompts=500)
    pools = {
        "eval": {p for p, _ in arith.eval_problems(200, cfg=cfg)},
        "sft": {r["prompt"] for r in arith.sft_records(cfg, cfg.num_sft)},
        "prompts": {r["prompt"] for r in arith.prompt_records(cfg, cfg.num_prompts)},
        "text": {r["text"].split(" A:")[0] + " A:" for r in arith.text_records(cfg, cfg.num_docs)},
    }
    names = list(pools)
    for i, x in enumerate(names):
        assert all(arith.bucket(p) == x for p in pools[x])
        for y in names[i + 1 :]:
            assert not pools[x] & pools[y], (x, y)
    assert len(pools["eval"]) == 200 and len(pools["sft"]) == 200
    problems = arith.eval_problems(200)
    assert problems == arith.eval_problems(200) and arith.eval_prompts(5) == [p for p, _ in problems[:5]]
    assert all(a == str(arith.solve(p)) for p, a in problems)
    recs = arith.prompt_records(cfg, 20)
    assert all(r["fields"] == {"answer": str(arith.solve(r["prompt"]))} for r in recs)
    assert arith.sft_records(cfg, 50) == arith.sft_records(cfg, 50)
    assert arith.sft_records(cfg, 50) != arith.sft_records(arith_section(seed=1), 50)


def test_demonstrations_are_slightly_noisy():
    cfg = arith_section(sft_noise=0.2)
    demos = arith.sft_records(cfg, 800)
    clean = np.array([d["response"] == arith.solution(d["prompt"]) for d in demos])
    assert 0.74 < clean.mean() < 0.86
    noisy = [d for d, c in zip(demos, clean, strict=True) if not c]
    right = np.array([arith.check(d["prompt"], d["response"], arith.solve(d["prompt"])) for d in noisy])
    formed = np.array([arith.final_answer(d["response"]) is not None for d in noisy])
    skipped = np.array([d["response"] == f" => {arith.solve(d['prompt'])}" for d in noisy])
    assert np.array_equal(right, skipped)  # only a skipped-work demonstration is still right
    for share in (1 - formed.mean(), skipped.mean()):  # a quarter each of the four flaws
        assert 0.12 < share < 0.38
    text = arith.text_records(cfg, 50)
    assert all(len(r["text"]) < 40 for r in text)  # one problem per document, far below the context


def test_records_by_format_and_split():
    cfg = arith_section(num_docs=30, num_sft=20, num_prompts=25, num_eval=10)
    assert [len(arith.records(f, "train", cfg)) for f in ("text", "sft", "prompt")] == [30, 20, 25]
    held = arith.records("prompt", "validation", cfg)
    assert [(r["prompt"], r["fields"]["answer"]) for r in held] == arith.eval_problems(10, cfg=cfg)
    assert arith.records("sft", "validation", cfg)[0]["response"] == arith.solution(held[0]["prompt"])
    with pytest.raises(ValueError, match="no 'rank' records"):
        arith.records("rank", "train", cfg)


def test_builtin_registration_and_config():
    c = data.arith_config("prompts")
    assert list(c.sources.keys()) == ["arith"] and c.sources.arith.builtin == "arith"
    assert c.sources.arith.format == "prompt" and c.arith.max_value == 9 and "tiny" in c
    with pytest.raises(ValueError, match="stage='rm'"):
        data.arith_config("rm")
    bad = data.default_config()
    bad.sources.x = data.source(format="prompt", builtin="arithmetic")
    with pytest.raises(
        ValueError, match=r"builtin='arithmetic': unknown built-in task; choose one of .*'arith'"
    ):
        data.make_iterator(
            bad, stage="prompts", batch_size=2, seq_len=16, seed=0, shard_index=0, num_shards=1
        )


def test_prompt_records_keep_their_other_fields():
    parse = formats.get("prompts").parse
    f = fields_config()
    rec = {"prompt": "Q: 1+1 A:", "answer": "2", "n": 3, "tags": ["a"], "meta": {"k": None}, "x": None}
    assert parse(rec, f, "here", None, None) == {
        "prompt": "Q: 1+1 A:",
        "fields": {k: v for k, v in rec.items() if k != "prompt"},
    }
    assert parse({"prompt": "p"}, f, "here", None, None) == {"prompt": "p"}
    renamed = fields_config(prompt="question")
    assert parse({"question": "q", "prompt": "kept"}, renamed, "here", None, None) == {
        "prompt": "q",
        "fields": {"prompt": "kept"},
    }
    chat = parse(
        {"messages": [{"role": "user", "content": "hi"}], "answer": "1"}, f, "here", lambda m, **_: "R", None
    )
    assert chat == {"prompt": "R", "fields": {"answer": "1"}}  # the messages are the prompt, not a field


def test_prompt_fields_align_with_rows_across_a_mixture_and_a_resume(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": "a?", "answer": "1", "meta": {"src": "x"}},
        {"prompt": "b?", "answer": 2},
        {"prompt": "c?"},  # no answer: None
        {"prompt": "d?", "meta": [1, 2]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = data.default_config()
    cfg.sources.mine = data.source(format="prompt", path=str(path))
    cfg.sources.arith = data.source(format="prompt", builtin="arith")
    cfg.arith.num_prompts = 12
    cfg.mixture = "mine:0.5,arith:0.5"
    it = data.make_iterator(
        cfg, stage="prompts", batch_size=8, seq_len=16, seed=0, shard_index=0, num_shards=1
    )
    assert it.field_names == ["answer", "meta"]
    by_prompt = {r["prompt"]: r for r in rows}
    seen = set()
    for _ in range(4):
        ids = next(it)["prompt_ids_B"]
        texts, fields = it.prompt_text(ids), it.prompt_fields(ids)
        assert set(fields) == {"answer", "meta"} and all(len(v) == len(ids) for v in fields.values())
        for i, p in enumerate(texts):
            seen.add(p in by_prompt)
            if p in by_prompt:
                assert fields["answer"][i] == by_prompt[p].get("answer")
                assert fields["meta"][i] == by_prompt[p].get("meta")
            else:
                assert fields["answer"][i] == str(arith.solve(p)) and fields["meta"][i] is None
    assert seen == {True, False}  # both sources were drawn
    state = it.get_state()
    ids = next(it)["prompt_ids_B"]
    it.set_state(state)
    again = next(it)["prompt_ids_B"]
    np.testing.assert_array_equal(ids, again)
    assert it.prompt_fields(ids) == it.prompt_fields(again)
    assert it.prompt_fields(np.zeros((0,), np.int32)) == {"answer": [], "meta": []}


def test_prompt_fields_are_empty_without_extra_fields(tmp_path):
    cfg = data.tiny_config("prompts")
    cfg.tiny.update(num_prompts=20)
    it = data.make_iterator(
        cfg, stage="prompts", batch_size=4, seq_len=16, seed=0, shard_index=0, num_shards=1
    )
    assert it.prompt_fields(next(it)["prompt_ids_B"]) == {}


def test_config_sections_are_locked():
    c = data.default_config()
    assert isinstance(c.arith, ml_collections.ConfigDict)
    with pytest.raises(AttributeError):
        c.arith.max_valu = 3  # a misspelt key fails
