"""Best-of-N: the argmax pick, the analytic KL, the unbiased pool estimate; the overoptimization fits."""

import itertools
import math

import numpy as np
import pytest

from gptjax.rl import bon


def test_kl_of_best_of_n_known_values():
    np.testing.assert_allclose(bon.kl_bon([1, 2, 16]), [0.0, math.log(2) - 0.5, math.log(16) - 15 / 16])
    assert np.all(np.diff(bon.kl_bon(np.arange(1, 100))) > 0)  # grows with n, like log n


def test_pick_best_is_the_argmax_first_on_ties():
    proxy = np.array([[0.1, 0.9, 0.3], [2.0, 2.0, -1.0], [-3.0, -2.0, -2.5]])
    np.testing.assert_array_equal(bon.pick_best(proxy), [1, 0, 1])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_pool_estimate_equals_every_subset_averaged(n):
    """The C(r, n-1) / C(N, n) weights give exactly the mean, over all n-subsets of the N samples, of the
    gold reward of the subset's proxy argmax (ties included)."""
    rng = np.random.default_rng(n)
    proxy = rng.integers(0, 4, (5, 7)).astype(float)  # many ties
    gold = rng.normal(size=(5, 7))
    brute = np.zeros(5)
    subsets = list(itertools.combinations(range(7), n))
    for s in subsets:
        idx = np.array(s)
        best = idx[bon.pick_best(proxy[:, idx])]
        brute += gold[np.arange(5), best]
    brute /= len(subsets)
    np.testing.assert_allclose(bon.best_of_n_expectation(proxy, gold, n), brute, rtol=1e-12)
    assert bon.best_of_n_weights(7, n).sum() == pytest.approx(1.0)


def test_best_of_n_curve_ends_at_the_argmax_and_starts_at_the_mean():
    rng = np.random.default_rng(0)
    proxy, gold = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    rows = bon.best_of_n_curve(proxy, gold, [1, 8])
    assert rows[0]["gold"] == pytest.approx(gold.mean()) and rows[0]["kl"] == 0.0
    assert rows[1]["proxy"] == pytest.approx(proxy.max(axis=1).mean())
    assert rows[1]["gold"] == pytest.approx(gold[np.arange(40), proxy.argmax(axis=1)].mean())
    assert rows[1]["d"] == pytest.approx(math.sqrt(math.log(8) - 7 / 8))
    with pytest.raises(ValueError, match="1 <= n <= N"):
        bon.best_of_n_curve(proxy, gold, [9])


def test_fits_recover_alpha_beta_from_points_of_each_form():
    rng = np.random.default_rng(1)
    d = np.linspace(0.05, 4.0, 40)
    bon_points = bon.bon_form(d, 0.9, 0.25) + rng.normal(scale=0.005, size=d.shape)
    rl_points = bon.rl_form(d, 0.6, 0.35) + rng.normal(scale=0.005, size=d.shape)
    np.testing.assert_allclose(bon.fit_bon(d, bon_points), (0.9, 0.25), atol=0.01)
    np.testing.assert_allclose(bon.fit_rl(np.r_[0.0, d], np.r_[0.0, rl_points]), (0.6, 0.35), atol=0.01)
    # the wrong form does not fit the other's points as well
    a, b = bon.fit_bon(d, rl_points)
    assert np.abs(bon.bon_form(d, a, b) - rl_points).mean() > 5 * 0.005


def test_rejection_sampling_stage_writes_the_best_samples_as_demonstrations(small_base, tmp_path):
    """stage=bon: n samples per prompt from the SFT model, the RM's best written as demonstrations (what the
    RM scores them at is what the stage logged), then SFT on them through the SFT data path; a resumed run
    reuses the file. Random SFT and reward models (a normal-initialised scalar head, so samples score
    differently) of the tests' small shapes."""
    import json
    import os

    from helpers import SMALL_CONFIG

    from gptjax import checkpoint, train
    from gptjax.data import get_vocabulary
    from gptjax.rl import reward
    from gptjax.train import defaults

    sft, rm = os.path.join(small_base, "sft"), os.path.join(small_base, "rm")
    c = defaults.load_config(f"{SMALL_CONFIG}:stage=bon,sft={sft},rm={rm}")
    c.unlock()
    # random models rarely emit EOS: let unfinished samples compete
    c.bon.update(prompts=12, n=3, max_new_tokens=6, require_eos=False)
    c.train.update(steps=2, checkpoint_every=2, batch_size=8)
    workdir = str(tmp_path / "bon")
    train.run(c, workdir)
    path = os.path.join(workdir, "bon_demonstrations.jsonl")
    lines = [json.loads(x) for x in open(path)]
    stats = json.load(open(os.path.join(workdir, "bon_stats.json")))
    assert len(lines) == stats["written"] == 12 and stats["skipped_no_eos"] == 0
    vocab = get_vocabulary(c.data)
    scores = reward.scorer(rm, vocab, c.train.seq_len)([(r["prompt"], [r["response"]]) for r in lines])
    assert np.mean(np.concatenate(scores)) == pytest.approx(stats["rm_best"], abs=1e-4)
    assert stats["rm_best"] > stats["rm_all"]  # the best of 3 beats the average sample
    assert checkpoint.load_meta(workdir)[0] == 2
    stamp = os.path.getmtime(path)
    c.train.update(steps=3, checkpoint_every=3)
    train.run(c, workdir)  # resumes: the demonstrations are not sampled again
    assert os.path.getmtime(path) == stamp and checkpoint.load_meta(workdir)[0] == 3
