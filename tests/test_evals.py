"""Evaluators as units: each built-in's numbers against an independent computation on a tiny model, the loop
running configured evaluators on their cadence (every stage, RL included) and writing results.json, a user's
'module:function' evaluator, and clear errors for unknown evaluators and options."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import logged, random_params, rl_model_cfg, tiny_config

from gptjax import checkpoint, data, evals, model, train
from gptjax.data import tiny
from gptjax.evals import evaluate
from gptjax.train import defaults


def small(stage="pretrain", **overrides):
    c = tiny_config(stage, **overrides)
    return c, model.config_from_dict(c.model.to_dict()), data.get_vocabulary(c.data)


def zeros_of(cfg):
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), model.param_shapes(cfg))


# --------------------------------------------------------------------------------------------------
# Built-ins against independent computations


def test_text_loss_of_a_zero_model_is_log_vocab():
    c, cfg, vocab = small()
    out = evals.measure(
        "text_loss",
        evals.Inputs.of_models({"model": (cfg, zeros_of(cfg))}, vocab, config=c),
        batches=1,
        batch_size=8,
    )
    assert out["text_loss"] == pytest.approx(math.log(cfg.vocab_size), rel=1e-5)
    assert out["text_tokens"] > 100  # the pretraining run's own validation text at its seq_len


def test_kl_of_a_model_to_itself_is_zero_and_to_another_positive():
    c, cfg, vocab = small()
    p, q = random_params(cfg, 0), random_params(cfg, 1)
    inputs = evals.Inputs.of_models({"model": (cfg, p), "ref": (cfg, p), "other": (cfg, q)}, vocab, config=c)
    opts = dict(prompts=4, samples=2, batch_size=8, max_new_tokens=4)
    same = evals.measure("kl", inputs, ref="@ref", **opts)
    assert same["kl_to_ref"] == 0.0 and same["kl_to_ref_se"] == 0.0
    other = evals.measure("kl", inputs, ref="@other", **opts)
    assert other["kl_to_ref"] > 0  # an estimate of a KL between different models over 8 samples


def test_gold_reward_mean_and_standard_error_on_hand_made_answers(monkeypatch):
    prompts = tiny.eval_prompts(n=3)
    answers = {p: [tiny.solve(p), tiny.solve(p)[:-1] + "?"] for p in prompts}  # right, and one char wrong
    ended = [True, False]  # the second never ended: -0.3

    def fake_batches(cfg, params, vocab, prompts_, n, rng, max_new_tokens, temperature, batch_size):
        assert n == 2 and list(prompts_) == prompts and temperature == 0.7
        rep = [p for p in prompts_ for _ in range(n)]
        texts = [a for p in prompts_ for a in answers[p]]
        yield rep, texts, np.array(ended * len(prompts_)), np.array([len(t) for t in texts]), None, None, None

    monkeypatch.setattr(evaluate, "sample_batches", fake_batches)
    c, cfg, vocab = small()
    inputs = evals.Inputs.of_models({"model": (cfg, None)}, vocab, config=c)
    out = evals.measure("gold", inputs, prompts=3, samples=2, temperature=0.7, greedy=False)
    per_prompt = np.array(
        [(tiny.gold_reward(p, a[0], True) + tiny.gold_reward(p, a[1], False)) / 2 for p, a in answers.items()]
    )
    assert per_prompt.max() < 1.0 and np.ptp(per_prompt) > 0  # partial credit that differs by prompt
    assert out["gold_reward_mean"] == pytest.approx(per_prompt.mean())
    assert out["gold_reward_se"] == pytest.approx(per_prompt.std(ddof=1) / math.sqrt(3))
    assert out["per_prompt"] == pytest.approx(per_prompt.tolist()) and out["eos_rate"] == 0.5
    # a 'module:function' gold replaces the tiny task's
    out = evals.measure(
        "gold", inputs, prompts=3, samples=2, temperature=0.7, greedy=False, gold="test_evals:length_gold"
    )
    assert out["gold_reward_mean"] == pytest.approx(np.mean([len(a) for p in prompts for a in answers[p]]))


def length_gold(prompt, response, finished=True):
    return float(len(response))


def test_gold_evaluator_gives_the_numbers_of_compare_policies():
    """What the pipeline reported before evaluators existed: same prompts, keys and formulas."""
    c, cfg, vocab = small()
    p, ref = random_params(cfg, 0, std=0.3), random_params(cfg, 1, std=0.3)
    prompts = tiny.eval_prompts(n=6)
    want = evaluate.compare_policies(
        {"p": (cfg, p)},
        vocab,
        prompts,
        tiny.gold_reward,
        rng=jax.random.key(1),
        ref=(cfg, ref),
        samples_per_prompt=2,
        max_new_tokens=6,
        batch_size=8,
    )["p"]
    inputs = evals.Inputs.of_models({"policy": (cfg, p), "ref": (cfg, ref)}, vocab)
    got = evals.measure("gold", inputs, prompts=6, samples=2, max_new_tokens=6, batch_size=8, ref="@ref")
    for key in ("gold_reward_mean", "gold_reward_se", "kl_to_ref", "eos_rate", "mean_length", "per_prompt"):
        assert got[key] == want[key], key
    greedy = evaluate.gold_reward_eval(
        cfg, p, vocab, prompts, tiny.gold_reward, rng=jax.random.key(0), max_new_tokens=6
    )
    assert got["greedy_gold_reward"] == greedy["gold_reward"] and got["samples"] == greedy["samples"]


def test_rm_accuracy_counts_pairs_in_the_labels_order():
    from ml_collections import FrozenConfigDict

    from gptjax.losses.ctx import Ctx
    from gptjax.rl import reward

    c, cfg, vocab = small("rm")
    params = random_params(cfg, 2, std=0.5)
    inputs = evals.Inputs.of_models({"model": (cfg, params)}, vocab, config=c)
    out = evals.measure("rm_accuracy", inputs, examples=6, demos=4)
    rankings = [(r["prompt"], r["responses"]) for r in tiny.records("rank", "validation", c.data.tiny)][:6]
    ctx = Ctx(model_cfg=cfg, loss_cfg=FrozenConfigDict(c.loss))
    scores = reward.score(ctx, params, vocab, rankings, c.train.seq_len)
    right = [s[i] > s[j] for s in scores for i in range(len(s)) for j in range(i + 1, len(s))]
    assert out["pairs"] == len(right) and out["pairwise_accuracy"] == pytest.approx(np.mean(right))
    assert out["reward_std"] > 0 and "gold_agreement" in out and "demo_reward_mean" in out
    # a constant reward model orders no pair (a tie is wrong)
    flat = evals.measure(
        "rm_accuracy",
        evals.Inputs.of_models({"model": (cfg, zeros_of(cfg))}, vocab, config=c),
        examples=6,
        demos=0,
    )
    assert flat["pairwise_accuracy"] == 0.0 and "demo_reward_mean" not in flat


def test_best_of_one_is_the_sample_itself_at_zero_kl(rl_base):
    sft, rm = rl_base
    cfg, p = checkpoint.load_model(sft)
    vocab = data.get_vocabulary(tiny_config("sft").data)
    inputs = evals.Inputs.of_models({"policy": (cfg, p)}, vocab)
    opts = dict(prompts=4, max_new_tokens=4, batch_size=8, reward=rm)
    one = evals.measure("best_of_n", inputs, n=1, **opts)
    assert one["kl_to_ref"] == 0.0 and len(one["per_prompt"]) == 4
    four = evals.measure("best_of_n", inputs, n=4, **opts)
    assert four["kl_to_ref"] == pytest.approx(math.log(4) - 3 / 4)
    assert 0.0 <= four["gold_reward_mean"] <= 1.0


# --------------------------------------------------------------------------------------------------
# The accessor and the config


def test_unknown_evaluators_and_options_are_named():
    c = tiny_config("sft")
    c.unlock()  # a config file adds its entries before it locks
    c.evals.bad = evals.entry("text_loss")
    c.evals.bad.fn = "no_such_evaluator"
    with pytest.raises(ValueError, match=r"config\.evals\.bad\.fn='no_such_evaluator'.*built-ins"):
        evals.configured(c)
    c.evals.bad.fn = "nowhere.at_all:fn"
    with pytest.raises(ValueError, match=r"config\.evals\.bad\.fn='nowhere\.at_all:fn': cannot import"):
        evals.configured(c)
    del c.evals["bad"]
    c.evals.gold = {"every": 5, "sampels": 3}  # the entry's name is its evaluator
    with pytest.raises(ValueError, match=r"config\.evals\.gold: unknown option\(s\) \['sampels'\]"):
        evals.configured(c)
    c.evals.gold = {"every": -1}
    with pytest.raises(ValueError, match=r"config\.evals\.gold\.every=-1"):
        evals.configured(c)
    with pytest.raises(ValueError, match="unknown option"):
        evals.entry("kl", reff="@ref")
    # an empty config.evals in every stage's defaults; an entry lists every option (the CLI can set each)
    assert len(defaults.base_config("sft").evals) == 0
    e = evals.entry("gold", every=3, samples=2)
    assert e.every == 3 and e.samples == 2 and e.prompts == 200 and e.ref == ""


def test_a_bad_entry_fails_before_the_workdir_is_made(tmp_path):
    c = tiny_config("sft")
    c.unlock()
    c.evals.x = {"fn": "nope"}
    with pytest.raises(ValueError, match=r"config\.evals\.x\.fn"):
        train.run(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# The loop


def seen(inputs, opts):
    """A user's evaluator: what it was shown (the step, the current params) and its option."""
    cfg, params = inputs.model("lm")
    return {"step_seen": float(inputs.step), "norm": float(optax.tree.norm(params)), "scale": opts.scale}


def test_the_loop_runs_evaluators_on_their_cadence_and_saves_the_last(tmp_path):
    def config(steps, with_evals=True):
        c = tiny_config("sft")
        c.unlock()
        c.train.update(steps=steps, checkpoint_every=2, log_every=1)
        if with_evals:
            c.evals.text = evals.entry("text_loss", every=2, batches=1, batch_size=8)
            c.evals.mine = {"fn": "test_evals:seen", "scale": 2.0}  # every 0: at the end only
        return c

    workdir = str(tmp_path / "sft")
    os.makedirs(workdir)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({"kept": 1}, f)  # someone else's key: merged, not clobbered
    train.run(config(3), workdir)
    assert [r["step"] for r in logged(workdir, "eval/text")] == [2, 3]  # every 2 and the last step
    mine = logged(workdir, "eval/mine")
    assert [r["step"] for r in mine] == [3] and mine[0]["step_seen"] == 3 and mine[0]["scale"] == 2.0
    _, params = checkpoint.load_model(workdir)
    assert mine[0]["norm"] == pytest.approx(
        float(optax.tree.norm(params)), rel=1e-6
    )  # the params after step 3
    results = json.loads(open(os.path.join(workdir, "results.json")).read())
    assert results["kept"] == 1 and set(results["evals"]) == {"text", "mine"}
    assert results["evals"]["text"]["step"] == 3
    assert results["evals"]["text"]["text_loss"] == logged(workdir, "eval/text")[-1]["text_loss"]

    # a resumed run (extended to 4 steps) logs each evaluation once
    train.run(config(4), workdir)
    assert [r["step"] for r in logged(workdir, "eval/text")] == [2, 3, 4]
    assert [r["step"] for r in logged(workdir, "eval/mine")] == [3, 4]
    assert json.loads(open(os.path.join(workdir, "results.json")).read())["evals"]["mine"]["step"] == 4

    # evaluators change neither the train state nor the training stream
    plain = str(tmp_path / "plain")
    train.run(config(3, with_evals=False), plain)
    assert [r["loss"] for r in logged(plain)] == [r["loss"] for r in logged(workdir)][:3]
    _, plain_params = checkpoint.load_model(plain, step=3)
    _, eval_params = checkpoint.load_model(workdir, step=3)
    assert all(
        jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), plain_params, eval_params))
    )
    assert not os.path.exists(os.path.join(plain, "results.json"))


def test_an_rl_run_evaluates_its_policy_against_its_own_frozen_roles(rl_base, tmp_path):
    sft, rm = rl_base
    c = defaults.load_config(f"configs/tiny.py:stage=grpo,sft={sft},rm={rm}")
    c.unlock()
    c.roles.policy.model = defaults.model_section(rl_model_cfg())
    c.rollout.update(batch_size=16, max_new_tokens=8, epochs=1, reward_at="last", gold="")
    c.train.update(batch_size=8, seq_len=c.rollout.prompt_len + 8, steps=2, checkpoint_every=2, log_every=1)
    small_gold = dict(prompts=4, samples=2, max_new_tokens=4, batch_size=8, greedy=False)
    c.evals.gold = evals.entry("gold", every=1, ref="@ref", reward="@reward", **small_gold)
    workdir = str(tmp_path / "grpo")
    train.run(c, workdir)
    rows = logged(workdir, "eval/gold")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["gold_reward_mean"] <= 1.0 and math.isfinite(r["rm_reward_mean"])
    assert rows[1]["kl_to_ref"] != 0.0  # the policy moved away from the reference
    results = json.loads(open(os.path.join(workdir, "results.json")).read())["evals"]["gold"]
    assert results["step"] == 2 and "per_prompt" not in results  # numbers only
