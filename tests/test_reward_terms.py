"""Reward terms: an RL rollout's reward as a weighted sum of a frozen reward model and Python functions. The
checks each function's output gets (named errors showing the prompt and response), DAPO's overlong term,
the sampler-vs-trainer log-prob agreement and truncated importance weights on known arrays, dynamic
sampling on a rollout, and a GRPO run from the command line's keys with no reward model at all."""

import time
import types

import numpy as np
import pytest
from helpers import logged, random_params, rl_model_cfg
from ml_collections import FrozenConfigDict

from gptjax import train
from gptjax.model import sharding
from gptjax.rl import reward_terms, rollout
from gptjax.train import defaults
from gptjax.train import step as step_lib

# --------------------------------------------------------------------------------------------------
# Functions a user brings


def length_reward(prompts, responses, **fields):
    """One value per response: its length in characters (plus the record's ``bonus`` field when it has
    one)."""
    bonus = fields.get("bonus") or [0] * len(prompts)
    return [len(r) + b for r, b in zip(responses, bonus, strict=True)]


SEEN: list = []


def recorded_reward(prompts, responses, **fields):
    """Counts the letter 'a' in each response and remembers what it returned (the test reads it back)."""
    out = [float(r.count("a")) for r in responses]
    SEEN.append(out)
    return out


def term(fn, name="t", weight=1.0, **options):
    return reward_terms.Term(name, f"test_reward_terms:{fn.__name__}", weight, fn, options)


def test_a_function_term_gets_the_prompts_responses_and_fields_and_its_options():
    def fn(prompts, responses, answer, scale):
        return [scale * (r == a) for r, a in zip(responses, answer, strict=True)]

    out = reward_terms.score_term(
        term(fn, scale=2.0), ["1+1=", "2+2="], ["2", "5"], {"answer": ["2", "4"]}, timeout_s=10
    )
    np.testing.assert_array_equal(out, [2.0, 0.0])
    values = {"a": np.array([1.0, 2.0]), "b": np.array([10.0, 0.0])}
    terms = [term(fn, "a", 0.5), term(fn, "b", -1.0)]
    np.testing.assert_allclose(reward_terms.weighted_sum(terms, values, 2), [0.5 - 10.0, 1.0])


def test_a_function_that_raises_is_named_with_the_first_prompt_and_response_it_fails_on():
    def picky(prompts, responses, **_):
        return [1.0 / (len(r) - 3) for r in responses]  # ZeroDivisionError on a 3-character response

    with pytest.raises(RuntimeError, match=r"'t'.*ZeroDivisionError.*row 1: prompt 'q2', response 'abc'"):
        reward_terms.score_term(term(picky), ["q1", "q2", "q3"], ["ab", "abc", "abcd"], {}, timeout_s=10)


@pytest.mark.parametrize(
    "returns,message",
    [
        (lambda n: [1.0] * (n - 1), "returned 2 values for 3 responses"),
        (lambda n: [1.0, float("nan"), 2.0], r"returned nan for row 1: prompt 'q2', response 'r2'"),
        (lambda n: [1.0, "x", 2.0], "must return one number per response"),
    ],
)
def test_a_function_with_the_wrong_output_is_a_named_error(returns, message):
    def fn(prompts, responses, **_):
        return returns(len(prompts))

    with pytest.raises(ValueError, match=message):
        reward_terms.score_term(term(fn), ["q1", "q2", "q3"], ["r1", "r2", "r3"], {}, timeout_s=10)


def test_a_slow_function_stops_the_run_at_its_deadline():
    def slow(prompts, responses, **_):
        time.sleep(5)
        return [0.0] * len(prompts)

    start = time.perf_counter()
    with pytest.raises(TimeoutError, match=r"'t'.*reward_fn_timeout_s=0.2"):
        reward_terms.score_term(term(slow), ["q"], ["r"], {}, timeout_s=0.2)
    assert time.perf_counter() - start < 2


def test_overlong_penalty_is_zero_then_a_ramp_then_minus_one_when_cut_off():
    lengths = np.array([4, 6, 7, 8, 8, 10])
    ended = np.array([True, True, True, True, False, False])
    # L = 8, buffer 4: free up to 4 tokens, then -(n - 4) / 4; cut off (no EOS): -1
    np.testing.assert_allclose(
        reward_terms.overlong_penalty(lengths, ended, 8, 4), [0, -0.5, -0.75, -1.0, -1.0, -1.0]
    )


def test_config_errors_name_the_key():
    c = defaults.load_config("configs/tiny.py:stage=grpo,sft=s,rm=r")
    c.unlock()
    c.rollout.update(rm_weight=0.0)
    assert "no reward function" in " ".join(reward_terms.check_config(c))
    c.rollout.update(reward_fn="no_such_module:f")
    assert "rollout.reward_fn='no_such_module:f': cannot import it" in reward_terms.check_config(c)[0]
    c.rollout.update(reward_fn="test_reward_terms")
    assert "'module:function'" in reward_terms.check_config(c)[0]
    c.rollout.update(reward_fn="test_reward_terms:length_reward", rm_weight=-1.0, overlong_buffer=9)
    c.rollout.max_new_tokens = 8
    problems = reward_terms.check_config(c)
    assert any("rm_weight=-1.0" in p for p in problems) and any("overlong_buffer=9" in p for p in problems)
    c.rollout.update(rm_weight=0.0, overlong_buffer=0)
    c.rollout.reward_terms = {"length_reward": {"fn": "test_reward_terms:length_reward"}}
    assert "each needs its own name" in reward_terms.check_config(c)[0]
    c.rollout.reward_terms = {"long": {"fn": "test_reward_terms:length_reward", "weight": 0.1, "cap": 3}}
    assert reward_terms.check_config(c) == []
    terms = reward_terms.function_terms(c)
    assert [(t.name, t.weight, t.options) for t in terms] == [
        ("length_reward", 1.0, {}),
        ("long", 0.1, {"cap": 3}),
    ]


# --------------------------------------------------------------------------------------------------
# Sampler vs trainer log-probs


def test_sampler_agreement_aligns_response_tokens_and_truncates_importance_weights():
    # two rows of L = 6: prompts of 2 and 3 tokens, responses of 3 and 2 tokens (T = 3)
    trainer_BL = np.zeros((2, 6))
    trainer_BL[0, 2:5] = [-1.0, -2.0, -0.5]
    trainer_BL[1, 3:5] = [-1.0, -3.0]
    sampler_BT = np.array([[-1.0, -2.5, -0.5], [-1.5, -3.0, -9.0]])  # row 1's last one is off the mask
    metrics, w_BL = rollout.sampler_agreement(trainer_BL, sampler_BT, np.array([2, 3]), np.array([3, 2]), 1.2)
    assert metrics["sampler_logp_diff_mean"] == pytest.approx((0 + 0.5 + 0 + 0.5 + 0) / 5)
    assert metrics["sampler_logp_diff_max"] == pytest.approx(0.5)
    expected = np.ones((2, 6), np.float32)
    expected[0, 2:5] = [1.0, min(np.exp(0.5), 1.2), 1.0]
    expected[1, 3:5] = [min(np.exp(0.5), 1.2), 1.0]
    np.testing.assert_allclose(w_BL, expected, rtol=1e-6)
    assert metrics["tis_clipped_frac"] == pytest.approx(2 / 5)
    assert rollout.sampler_agreement(trainer_BL, sampler_BT, np.array([2, 3]), np.array([3, 2]))[1] is None


# --------------------------------------------------------------------------------------------------
# A rollout whose reward is all functions


class TextPrompts:
    """The prompt-iterator protocol over fixed token prompts, with their strings and a record field."""

    def __init__(self, n):
        self.batches, self.n = 0, n

    def __next__(self):
        ids = np.arange(self.batches * self.n, (self.batches + 1) * self.n, dtype=np.int32)
        self.batches += 1
        return {
            "prompt_BP": np.full((self.n, 16), 97, np.int32),
            "prompt_lengths_B": np.full((self.n,), 4, np.int32),
            "prompt_ids_B": ids,
        }

    def prompt_text(self, ids):
        return [f"p{i}" for i in ids]

    def prompt_fields(self, ids):
        return {"tie": [bool(i % 2 == 0) for i in ids]}

    def get_state(self):
        return {"batches": self.batches}

    def set_state(self, state):
        self.batches = state["batches"]


def tie_even_prompts(prompts, responses, tie, **_):
    """Even prompts' groups all score 0 (a tied group); odd prompts score their response's length."""
    return [0.0 if t else float(len(r)) for r, t in zip(responses, tie, strict=True)]


def function_rollout(**rollout_over):
    c = defaults.load_config("configs/tiny.py:stage=grpo,sft=unused,rm=unused")
    c.unlock()
    c.roles.policy.model = defaults.model_section(rl_model_cfg())
    c.rollout.update(batch_size=16, samples_per_prompt=4, max_new_tokens=8, gold="", rm_weight=0.0)
    c.rollout.update(**rollout_over)
    c.train.update(batch_size=8, seq_len=c.rollout.prompt_len + 8)
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    lm = rl_model_cfg()
    ctx = step_lib.Ctx(
        model_cfg=lm,
        loss_cfg=FrozenConfigDict(c.loss),
        frozen={"ref": random_params(lm, 1, mesh)},
        frozen_cfgs=(("ref", lm),),
        role_cfgs=(("policy", lm),),
    )
    prompts = TextPrompts(4)
    source = rollout.RolloutSource(c, batch_size=8, ctx=ctx, mesh=mesh, prompts=prompts)
    source.next(types.SimpleNamespace(params={"policy": random_params(lm, 0, mesh)}))
    return source, prompts


def test_dynamic_sampling_replaces_tied_groups_with_new_prompts_and_counts_them():
    fn = "test_reward_terms:tie_even_prompts"
    source, prompts = function_rollout(reward_fn=fn, dynamic_sampling=True, max_extra_generations=1)
    metrics = source.pop_metrics()
    # 4 prompts, 2 tied; one extra generation of 4 more prompts brings 2 informative groups
    assert metrics["dynamic_sampling/tied_groups"] == 2.0
    assert metrics["dynamic_sampling/extra_generations"] == 1.0 and prompts.batches == 2
    assert metrics["dynamic_sampling/tied_groups_kept"] == 0.0
    # the extra generation's tokens count as generated though only 16 of the 32 rows are kept
    kept_tokens = metrics["response_length"] * 16
    assert metrics["tokens_generated"] > 1.5 * kept_tokens
    score_B = source.buffer["advantages_BL"].any(axis=1)
    assert score_B.sum() > 8  # responses of the informative groups carry advantages
    # without it, the tied groups stay (their advantages are 0)
    source, prompts = function_rollout(reward_fn=fn)
    metrics = source.pop_metrics()
    assert prompts.batches == 1 and "dynamic_sampling/tied_groups" not in metrics
    assert metrics["tokens_generated"] == pytest.approx(metrics["response_length"] * 16)
    assert not source.buffer["advantages_BL"][[0, 1, 2, 3, 8, 9, 10, 11]].any()
    # the sampler's log-probs agree with the trainer's in fp32: importance weights of 1
    source, _ = function_rollout(reward_fn=fn, tis_cap=2.0)
    m = source.pop_metrics()
    assert m["sampler_logp_diff_max"] < 1e-4 and m["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(source.buffer["is_weight_BL"], 1.0, atol=1e-4)


# --------------------------------------------------------------------------------------------------
# GRPO trained on a function alone, from the command line's keys


def test_grpo_trains_on_a_reward_function_with_no_reward_model(rl_base, tmp_path):
    sft, _ = rl_base
    c = defaults.load_config(f"configs/tiny.py:stage=grpo,sft={sft},rm={tmp_path}/no-such-reward-model")
    c.unlock()
    c.roles.policy.model = defaults.model_section(rl_model_cfg())
    c.rollout.update(batch_size=16, max_new_tokens=8, epochs=1, gold="")
    # as --config.rollout.reward_fn=... --config.rollout.reward_fn_weight=0.5 --config.rollout.rm_weight=0
    c.rollout.update(reward_fn="test_reward_terms:recorded_reward", reward_fn_weight=0.5, rm_weight=0.0)
    c.train.update(batch_size=8, seq_len=c.rollout.prompt_len + 8, steps=4, checkpoint_every=4, log_every=1)
    SEEN.clear()
    workdir = str(tmp_path / "grpo")
    train.run(c, workdir)
    assert len(SEEN) == 2  # two rollouts of 16 responses, 2 minibatches each
    rows = logged(workdir, "rollout")
    assert len(rows) == 2
    for row, values in zip(rows, SEEN, strict=True):
        assert row["reward/recorded_reward"] == pytest.approx(np.mean(values))
        assert row["reward"] == pytest.approx(0.5 * np.mean(values), rel=1e-5)
        assert "reward/rm" not in row and row["sampler_logp_diff_max"] < 1e-4
