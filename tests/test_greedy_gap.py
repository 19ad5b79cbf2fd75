"""The greedy-gap analysis (gptjax/research/greedy_gap.py): its counters and tables on hand-made answers,
and on two random tiny models that temperature 0 is the gold evaluator's greedy pass, that temperature 1 is
its sampled pass, and that the entropy and log-probabilities along an answer are a plain forward pass's."""

import jax
import numpy as np
import pytest
from helpers import random_params, tiny_config

from gptjax import checkpoint, data, evals, model
from gptjax.data import tiny
from gptjax.evals import evaluate
from gptjax.evals import gold as gold_eval
from gptjax.research import greedy_gap as gg


def test_mode_agreement_counts_cells_and_splits_the_gold_difference():
    gold_a = np.array([0.5, 0.5, 1.0, 0.2, 0.7, 0.3])
    gold_b = np.array([1.0, 0.0, 1.0, 0.2, 0.1, 0.3])
    rm_a = np.array([0.0, 0.0, 0.0, 0.5, 0.0, 0.0])
    rm_b = np.array([1.0, 1.0, 1.0, 0.1, -1.0, 9.0])
    same = np.array([False, False, False, False, False, True])  # the last: identical answers
    m = gg.mode_agreement(gold_a, gold_b, rm_a, rm_b, same)
    assert (m["prompts"], m["same"], m["differ"]) == (6, 1, 5)
    assert (m["rm_up_gold_up"], m["rm_up_gold_down"], m["rm_up_gold_tie"]) == (1, 1, 1)
    assert (m["rm_down_gold_tie"], m["rm_down_gold_down"], m["rm_down_gold_up"]) == (1, 1, 0)
    assert m["gold_diff_rm_up_gold_up"] == pytest.approx(0.5 / 6)
    assert m["gold_diff_rm_up_gold_down"] == pytest.approx(-0.5 / 6)
    assert m["gold_diff_rm_down_gold_down"] == pytest.approx(-0.6 / 6)
    shares = sum(v for k, v in m.items() if k.startswith("gold_diff_"))
    assert shares == pytest.approx(np.mean(gold_b - gold_a))  # the cells add up to the mean difference
    # gold not tied on prompts 0, 1, 4: the RM orders 0 and 4 like the gold, 1 the other way
    assert m["gold_pairs"] == 3 and m["rm_accuracy"] == pytest.approx(2 / 3)


def test_rm_gold_accuracy_leaves_gold_ties_out():
    acc = gg.rm_gold_accuracy(
        np.array([[0.0, 1.0], [0.5, 0.5]]),
        np.array([[1.0, 0.0], [0.5, 0.9]]),
        np.array([[0.0, 0.0], [0.0, 0.0]]),
        np.array([[1.0, 1.0], [-3.0, -1.0]]),
    )
    assert acc == {"pairs": 3, "rm_accuracy": pytest.approx(1 / 3)}


def test_sweep_table_and_by_kind_on_hand_made_answers():
    prompts = ["sort cab=", "up ab=", "sort ba="]
    ok = {p: tiny.solve(p) for p in prompts}
    answers = {
        0.0: {
            "sft": gg.Answers([[ok[prompts[0]]], ["x"], ["ab"]], np.ones((3, 1), bool)),
            "ppo": gg.Answers([["x"], [ok[prompts[1]]], ["ab"]], np.ones((3, 1), bool)),
        },
        1.0: {
            "sft": gg.Answers([["abc", "abc"], ["AB", "A"], ["ab", "x"]], np.ones((3, 2), bool)),
            "ppo": gg.Answers([["abc", "abc"], ["AB", "AB"], ["ab", "ab"]], np.ones((3, 2), bool)),
        },
    }
    gold = lambda p, r, finished=True: float(r == tiny.solve(p))
    table = gg.sweep_table(prompts, answers, gold)
    assert table["0"]["sft"]["gold"] == pytest.approx(2 / 3) and "vs_sft" not in table["0"]["sft"]
    assert table["0"]["ppo"]["vs_sft"] == pytest.approx(0.0)
    assert table["0"]["ppo"]["vs_sft_se"] == pytest.approx(np.std([-1, 1, 0], ddof=1) / np.sqrt(3))
    assert table["1"]["sft"]["distinct"] == pytest.approx(5 / 3) and table["1"]["ppo"]["distinct"] == 1.0
    assert table["1"]["ppo"]["vs_sft"] == pytest.approx(1 / 3)
    kinds = gg.by_kind(prompts, np.array([1.0, 0.0, 1.0]), np.array([0.0, 1.0, 1.0]))
    assert list(kinds) == ["sort", "up"]
    assert kinds["sort"] == {"n": 2, "a": 1.0, "b": 0.5, "diff": -0.5, "diff_se": pytest.approx(0.5)}
    assert kinds["up"]["diff"] == 1.0 and kinds["up"]["diff_se"] == 0.0


def letters_only(params, vocab):
    """``params`` with every token's (tied) embedding but the task's letters' and EOS's set to 0: their logits
    are 0, so the greedy answers are letters (and EOS) wherever a letter's logit is above 0."""
    keep_V = np.zeros(params["embed"].shape[0], bool)
    keep_V[[*(vocab.encode(c)[0] for c in tiny.LETTERS), vocab.eos_id]] = True
    return {**params, "embed": np.where(keep_V[:, None], np.asarray(params["embed"]), 0.0).astype(np.float32)}


def test_on_models_temperatures_match_the_gold_evaluator_and_stats_a_forward_pass(rl_base):
    sft_dir, rm_dir = rl_base
    vocab = data.get_vocabulary(tiny_config("sft").data)
    cfg, sft = checkpoint.load_model(sft_dir)
    policies = {"sft": (cfg, sft), "letters": (cfg, letters_only(random_params(cfg, 7, std=0.3), vocab))}
    prompts = tiny.eval_prompts(n=6)
    kw = dict(max_new_tokens=4, batch_size=8)
    reward_fn = gold_eval.reward_fn(evals.Inputs.of_models({}, vocab), rm_dir, seq_len=32)
    res = gg.analyse(
        policies,
        vocab,
        prompts,
        tiny.gold_reward,
        reward_fn,
        temperatures=(0.0, 1.0),
        samples=2,
        seq_len=32,
        **kw,
    )

    # temperature 0: the evaluators' greedy pass; temperature 1: the gold evaluator's samples (seed 1)
    greedy = evaluate.gold_reward_eval(
        cfg, sft, vocab, prompts, tiny.gold_reward, rng=jax.random.key(0), **kw
    )
    assert res["temperature"]["0"]["sft"]["gold"] == pytest.approx(greedy["gold_reward"])
    inputs = evals.Inputs.of_models({"policy": (cfg, sft)}, vocab)
    sampled = evals.measure("gold", inputs, prompts=6, samples=2, greedy=False, **kw)
    assert res["temperature"]["1"]["sft"]["gold"] == pytest.approx(sampled["gold_reward_mean"])
    assert res["temperature"]["1"]["sft"]["gold_se"] == pytest.approx(sampled["gold_reward_se"])

    m = res["modes"]["letters"]
    assert m["same"] + m["differ"] == 6
    cells = [k for k in m if k.startswith("rm_") and k.count("_gold_") and not k.startswith("rm_on")]
    assert sum(m[k] for k in cells) == m["differ"]
    shares = sum(v for k, v in m.items() if k.startswith("gold_diff_"))
    assert shares == pytest.approx(res["temperature"]["0"]["letters"]["vs_sft"])
    assert sum(k["n"] for k in res["kinds"]["letters"]["greedy"].values()) == 6
    assert sum(q["n"] * q["changed"] for q in m["by_base_prob"]) == pytest.approx(m["differ"])
    assert res["sharpness"]["sft"]["own_greedy"] == res["sharpness"]["sft"]["sft_greedy"]  # the same answers

    # response_stats against a plain forward pass (log p, entropy, argmax along BOS prompt response EOS) for
    # the policy that writes only letters or EOS, whose answers decode and encode back to the same tokens
    letters = policies["letters"]
    texts = [t[0] for t in gg.sample_answers(letters, vocab, prompts, samples=1, temperature=0.0,
                                             rng=jax.random.key(0), **kw).texts]  # fmt: skip
    assert all(set(t) <= set(tiny.LETTERS) for t in texts)
    stats = gg.response_stats(letters, vocab, prompts, texts, seq_len=32, batch_size=4)
    rows = [
        [vocab.bos_id, *vocab.encode(p), *vocab.encode(t), vocab.eos_id]
        for p, t in zip(prompts, texts, strict=True)
    ]
    # right-padded to one length (causal attention: the padding after a row is never read)
    tokens_BL = np.array([r + [vocab.pad_id] * (32 - len(r)) for r in rows])
    logp_BLV = np.asarray(jax.nn.log_softmax(model.apply(cfg, letters[1], tokens_BL), axis=-1))
    for i, p in enumerate(prompts):
        start, end = 1 + len(vocab.encode(p)), len(rows[i])
        pos = np.arange(start - 1, end - 1)  # the positions predicting the response and EOS
        target, logp_LV = tokens_BL[i, start:end], logp_BLV[i]
        assert stats["tokens_P"][i] == len(target)
        assert stats["logp_P"][i] == pytest.approx(logp_LV[pos, target].sum(), abs=1e-4)
        entropy = -(np.exp(logp_LV[pos]) * logp_LV[pos]).sum(-1).mean()
        assert stats["entropy_P"][i] == pytest.approx(entropy, abs=1e-4)
        hits = logp_LV[pos].argmax(-1) == target
        assert bool(stats["mode_P"][i]) == bool(hits.all())
        assert hits[:-1].all()  # a greedy answer's own tokens are the argmax path (EOS, when it ended, too)


def test_by_quantile_groups_prompts_by_a_score_low_to_high():
    x = np.array([0.9, 0.1, 0.5, 0.2])  # sorted: prompts 1, 3 | 2, 0
    a, b = np.array([1.0, 0.0, 0.5, 0.5]), np.array([1.0, 1.0, 0.0, 0.0])
    same = np.array([True, False, False, False])
    low, high = gg.by_quantile(x, a, b, same, bins=2)
    assert (low["lo"], low["hi"], low["n"], low["changed"]) == (0.1, 0.2, 2, 1.0)
    assert (low["a"], low["diff"]) == (0.25, 0.25) and low["diff_se"] == pytest.approx(0.75)
    assert (high["lo"], high["hi"], high["changed"], high["a"], high["diff"]) == (0.5, 0.9, 0.5, 0.75, -0.25)
