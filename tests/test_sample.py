"""gptjax.model.sample: cached generation against a full forward pass, filters, EOS, rng, frequencies,
errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model
from gptjax.model import sample, sharding

TINY = {"vocab_size": 61, "d_model": 32, "n_layers": 2, "n_heads": 4, "max_len": 24, "init_std": 0.2}
CFGS = {
    "gpt2": model.ModelConfig.gpt2(**TINY, tie_embeddings=False),  # untied: tied tiny models just echo
    "llama": model.ModelConfig.llama(**TINY, n_kv_heads=2),  # GQA, RoPE
}
PROMPT_LENGTHS = np.array([5, 2, 3])


@functools.cache
def _params(cfg):
    return model.init(cfg, jax.random.key(0))


def _prompts(cfg, B=3, P=5, seed=1):
    return jax.random.randint(jax.random.key(seed), (B, P), 0, cfg.vocab_size, dtype=jnp.int32)


_full_logits = jax.jit(model.apply, static_argnums=0)


def _teacher_forced(cfg, prompts_BP, plen_B, out):
    """Full forward (no cache) over prompt + response: logits_BTV that predicted each response token."""
    full_BL, resp_mask_BL = sample.concat_prompt_response(
        prompts_BP, jnp.asarray(plen_B), out.tokens_BT, out.lengths_B
    )
    logits_BLV = _full_logits(cfg, _params(cfg), full_BL)
    T = out.tokens_BT.shape[1]
    idx_BT = jnp.asarray(plen_B)[:, None] - 1 + jnp.arange(T)[None]
    return np.asarray(jnp.take_along_axis(logits_BLV, idx_BT[:, :, None], axis=1)), np.asarray(resp_mask_BL)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_greedy_equals_full_forward_argmax(family, scan_layers):
    # scan_layers: both decode paths (a stacked cache in a layer scan; per-layer cache buffers, unrolled)
    cfg = CFGS[family].replace(scan_layers=scan_layers)
    prompts = _prompts(cfg)
    out = sample.generate(
        cfg,
        _params(cfg),
        prompts,
        jax.random.key(2),
        max_new_tokens=7,
        temperature=0.0,
        prompt_lengths_B=PROMPT_LENGTHS,
        return_info=True,
    )
    logits_BTV, resp_mask_BL = _teacher_forced(cfg, prompts, PROMPT_LENGTHS, out)
    # Every generated token is the argmax of a cache-free forward pass over the sequence so far; the
    # tokens are not all equal, so the cache slots / positions really matter.
    np.testing.assert_array_equal(out.tokens_BT, logits_BTV.argmax(-1))
    assert len(np.unique(out.tokens_BT)) > 3
    np.testing.assert_allclose(
        out.logprobs_BT,
        np.take_along_axis(jax.nn.log_softmax(logits_BTV), np.asarray(out.tokens_BT)[..., None], -1)[..., 0],
        atol=1e-4,
    )
    np.testing.assert_array_equal(out.mask_BT, 1)
    np.testing.assert_array_equal(out.lengths_B, 7)
    assert not np.any(out.ended_B) and int(out.steps) == 7
    np.testing.assert_array_equal(resp_mask_BL.sum(1), 7)
    # What sits in the pad slots of a short prompt never reaches its row.
    garbage = jnp.where(jnp.arange(5)[None] < PROMPT_LENGTHS[:, None], prompts, 7)
    again = sample.generate(
        cfg,
        _params(cfg),
        garbage,
        jax.random.key(2),
        max_new_tokens=7,
        temperature=0.0,
        prompt_lengths_B=PROMPT_LENGTHS,
    )
    np.testing.assert_array_equal(again, out.tokens_BT)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sampled_logprobs_and_truncation_match_full_forward(family):
    cfg, temp, k, p = CFGS[family], 0.7, 12, 0.8
    prompts = _prompts(cfg, B=4, seed=3)
    plen = np.array([1, 5, 4, 2])
    out = sample.generate(
        cfg,
        _params(cfg),
        prompts,
        jax.random.key(4),
        max_new_tokens=6,
        temperature=temp,
        top_k=k,
        top_p=p,
        prompt_lengths_B=plen,
        return_info=True,
    )
    logits_BTV, _ = _teacher_forced(cfg, prompts, plen, out)
    tokens_BT = np.asarray(out.tokens_BT)
    # PPO convention: log_softmax(logits / T) before truncation.
    want_BT = np.take_along_axis(jax.nn.log_softmax(logits_BTV / temp), tokens_BT[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs_BT, want_BT, atol=1e-4)
    # Each sampled token lies in the top-k then top-p set of the full-forward distribution.
    kept_BTV = np.isfinite(
        sample.top_p_filter(
            sample.top_k_filter(jnp.asarray(logits_BTV / temp).reshape(-1, cfg.vocab_size), k), p
        )
    ).reshape(logits_BTV.shape)
    assert np.all(np.take_along_axis(kept_BTV, tokens_BT[..., None], -1))
    assert kept_BTV.sum(-1).max() < k  # the nucleus did cut something


def test_top_k_1_equals_greedy():
    cfg = CFGS["llama"]
    kw = {"max_new_tokens": 7, "prompt_lengths_B": PROMPT_LENGTHS}  # the greedy test's shapes: compiled once
    greedy = sample.generate(cfg, _params(cfg), _prompts(cfg), jax.random.key(5), temperature=0.0, **kw)
    top1 = sample.generate(
        cfg, _params(cfg), _prompts(cfg), jax.random.key(5), temperature=1.5, top_k=1, **kw
    )
    np.testing.assert_array_equal(top1, greedy)


def test_top_p_and_top_k_filters_on_known_logits():
    probs = np.array([0.15, 0.5, 0.05, 0.2, 0.1])  # ranks: 1, 3, 0, 4, 2
    logits_2V = jnp.log(jnp.asarray(np.stack([probs, probs[::-1]]), jnp.float32)) + 3.0
    for p, want in [
        (0.3, {1}),
        (0.69, {1, 3}),
        (0.8, {1, 3, 0}),
        (0.9, {1, 3, 0, 4}),
        (0.99, {0, 1, 2, 3, 4}),
    ]:
        kept_2V = np.isfinite(sample.top_p_filter(logits_2V, p))
        assert set(np.flatnonzero(kept_2V[0])) == want, p
        assert set(np.flatnonzero(kept_2V[1])) == {4 - i for i in want}, p
    kept = np.asarray(sample.top_p_filter(logits_2V, 0.69))
    np.testing.assert_allclose(kept[0, [1, 3]], np.asarray(logits_2V)[0, [1, 3]])  # kept logits untouched
    kept_k = np.isfinite(sample.top_k_filter(logits_2V, 2))
    assert set(np.flatnonzero(kept_k[0])) == {1, 3} and set(np.flatnonzero(kept_k[1])) == {3, 1}
    ties = np.isfinite(sample.top_k_filter(jnp.zeros((1, 6)), 3))
    assert ties.sum() == 3  # exactly k even under ties


def test_eos_stops_rows_pads_after_and_stops_loop():
    cfg = CFGS["gpt2"]
    params, prompts, T = _params(cfg), _prompts(cfg), 7  # the greedy test's shapes: compiled once
    kw = {"max_new_tokens": T, "temperature": 0.0, "prompt_lengths_B": PROMPT_LENGTHS, "return_info": True}
    free = sample.generate(cfg, params, prompts, jax.random.key(0), **kw)
    free_BT = np.asarray(free.tokens_BT)
    eos = int(free_BT[0, 3])
    out = sample.generate(cfg, params, prompts, jax.random.key(0), eos_id=eos, pad_id=60, **kw)
    for b in range(3):
        hits = np.flatnonzero(free_BT[b] == eos)
        n = int(hits[0]) + 1 if len(hits) else T
        assert int(out.lengths_B[b]) == n and bool(out.ended_B[b]) == bool(len(hits))
        np.testing.assert_array_equal(out.tokens_BT[b, :n], free_BT[b, :n])
        np.testing.assert_array_equal(out.tokens_BT[b, n:], 60)
        np.testing.assert_array_equal(out.mask_BT[b], np.arange(T) < n)
        np.testing.assert_array_equal(out.logprobs_BT[b, n:], 0.0)
        assert np.all(np.asarray(out.logprobs_BT[b, :n]) < 0)
    assert bool(out.ended_B[0]) and int(out.lengths_B[0]) <= 4
    # pad_id == eos_id (GPT-2 style tokenizers): lengths still count up to the first EOS.
    same = sample.generate(cfg, params, prompts, jax.random.key(0), eos_id=eos, pad_id=eos, **kw)
    np.testing.assert_array_equal(same.lengths_B, out.lengths_B)
    np.testing.assert_array_equal(same.mask_BT, out.mask_BT)
    np.testing.assert_array_equal(np.where(out.mask_BT, same.tokens_BT, 60), out.tokens_BT)
    # A batch whose every row has ended stops the loop early.
    ragged = int(out.steps)
    one = sample.generate(
        cfg,
        params,
        jnp.tile(prompts[:1], (3, 1)),
        jax.random.key(0),
        eos_id=eos,
        **{**kw, "prompt_lengths_B": np.full(3, PROMPT_LENGTHS[0])},
    )
    assert int(one.steps) == int(one.lengths_B[0]) <= 4 < T
    assert ragged == (T if not np.all(out.ended_B) else int(out.lengths_B.max()))


def test_same_rng_same_samples_different_rng_different():
    cfg = CFGS["llama"]
    params, prompts = _params(cfg), _prompts(cfg, B=4)
    gen = functools.partial(sample.generate, cfg, params, prompts, max_new_tokens=8, temperature=1.0)
    a, b, c = gen(jax.random.key(10)), gen(jax.random.key(10)), gen(jax.random.key(11))
    np.testing.assert_array_equal(a, b)
    assert np.mean(np.asarray(a) != np.asarray(c)) > 0.5
    assert len({tuple(r) for r in np.asarray(a)}) == 4  # rows sample independently


def test_sampling_frequencies_match_softmax():
    cfg = model.ModelConfig.llama(vocab_size=5, d_model=16, n_layers=1, n_heads=2, max_len=8, init_std=0.5)
    params, N, temp = _params(cfg), 4000, 0.8
    prompts_NP = jnp.tile(jnp.array([[1, 3, 2]], jnp.int32), (N, 1))
    logits_V = np.asarray(_full_logits(cfg, params, prompts_NP[:1])[0, -1], np.float64)
    probs_V = np.exp(logits_V / temp - np.logaddexp.reduce(logits_V / temp))
    assert probs_V.max() - probs_V.min() > 0.1  # a distribution worth testing
    order = np.argsort(-probs_V)

    def freqs(**kw):
        out = sample.generate(
            cfg,
            params,
            prompts_NP,
            jax.random.key(7),
            max_new_tokens=1,
            temperature=temp,
            return_info=True,
            **kw,
        )
        return np.bincount(np.asarray(out.tokens_BT[:, 0]), minlength=5) / N, out

    def check(f_V, want_V):
        tol_V = 4.5 * np.sqrt(want_V * (1 - want_V) / N) + 1e-9
        assert np.all(np.abs(f_V - want_V) <= tol_V), (f_V, want_V)

    f_V, out = freqs()
    check(f_V, probs_V)
    np.testing.assert_allclose(
        out.logprobs_BT[:, 0], np.log(probs_V)[np.asarray(out.tokens_BT[:, 0])], atol=1e-5
    )
    top2_V = np.where(np.isin(np.arange(5), order[:2]), probs_V, 0)
    check(freqs(top_k=2)[0], top2_V / top2_V.sum())
    p = probs_V[order[:3]].sum() - 1e-3  # nucleus of exactly the top 3
    top3_V = np.where(np.isin(np.arange(5), order[:3]), probs_V, 0)
    check(freqs(top_p=p)[0], top3_V / top3_V.sum())


def test_sharded_params_and_prompts_match_unsharded():
    cfg = CFGS["llama"]
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with jax.set_mesh(mesh):
        params = model.init(cfg, jax.random.key(0), mesh=mesh)
        prompts = sharding.shard_batch({"p": np.asarray(_prompts(cfg, B=4))}, mesh)["p"]
        out = sample.generate(
            cfg,
            params,
            prompts,
            jax.random.key(2),
            max_new_tokens=5,
            temperature=0.0,
            prompt_lengths_B=np.array([5, 2, 3, 4]),
        )
    want = sample.generate(
        cfg,
        _params(cfg),
        _prompts(cfg, B=4),
        jax.random.key(2),
        max_new_tokens=5,
        temperature=0.0,
        prompt_lengths_B=np.array([5, 2, 3, 4]),
    )
    np.testing.assert_array_equal(out, want)


def test_runs_inside_an_outer_jit_with_traced_lengths():
    cfg = CFGS["gpt2"]

    @jax.jit
    def rollout(params, prompts, lengths, rng):
        return sample.generate(
            cfg,
            params,
            prompts,
            rng,
            max_new_tokens=7,
            temperature=0.0,
            prompt_lengths_B=lengths,
            return_info=True,
        )

    out = rollout(_params(cfg), _prompts(cfg), jnp.asarray(PROMPT_LENGTHS), jax.random.key(0))
    want = sample.generate(
        cfg,
        _params(cfg),
        _prompts(cfg),
        jax.random.key(0),
        max_new_tokens=7,
        temperature=0.0,
        prompt_lengths_B=PROMPT_LENGTHS,
    )
    np.testing.assert_array_equal(out.tokens_BT, want)


def test_concat_prompt_response_layout():
    prompts = jnp.array([[1, 2, 3], [4, 0, 0]])
    tokens = jnp.array([[7, 8], [9, 5]])
    full, mask = sample.concat_prompt_response(
        prompts, jnp.array([3, 1]), tokens, jnp.array([1, 2]), pad_id=0
    )
    np.testing.assert_array_equal(full, [[1, 2, 3, 7, 0], [4, 9, 5, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 0], [0, 1, 1, 0, 0]])


@pytest.mark.parametrize(
    "cfg_kw, call_kw, match",
    [
        ({"head": "scalar"}, {}, "LM head"),
        ({}, {"prompts": np.zeros((2, 25), np.int32)}, r"25 tokens long .* max_len=24"),
        ({}, {"max_new_tokens": 20}, r"prompt length 5 \+ max_new_tokens 20 = 25 exceeds .* max_len=24"),
        ({}, {"prompt_lengths_B": np.array([5, 0])}, r"prompt_lengths_B\[1\]=0 is outside \[1, 5\]"),
        ({}, {"prompt_lengths_B": np.array([6, 2])}, r"prompt_lengths_B\[0\]=6"),
        ({}, {"prompt_lengths_B": np.array([5, 2, 3])}, r"shape \(3,\), expected \(2,\)"),
        ({}, {"top_p": 0.0}, "top_p=0.0"),
        ({}, {"top_k": 62}, "top_k=62"),
        ({}, {"temperature": -1.0}, "temperature=-1.0"),
        ({}, {"eos_id": 61}, "eos_id=61 is outside"),
        ({}, {"max_new_tokens": 0}, "max_new_tokens=0"),
        ({}, {"prompts": np.zeros((5,), np.int32)}, r"\[batch, prompt_len\]"),
    ],
)
def test_errors(cfg_kw, call_kw, match):
    cfg = CFGS["gpt2"].replace(**cfg_kw)
    kw = {"max_new_tokens": 4, **call_kw}
    prompts = kw.pop("prompts", np.zeros((2, 5), np.int32))
    with pytest.raises(ValueError, match=match):
        sample.generate(cfg, None, prompts, jax.random.key(0), **kw)


def test_rope_may_run_past_max_len_with_a_warning():
    cfg = CFGS["llama"]  # max_len 24 < 5 + 20
    out = sample.generate(
        cfg, _params(cfg), _prompts(cfg), jax.random.key(0), max_new_tokens=20, temperature=0.0, eos_id=None
    )
    assert out.shape == (3, 20)


def test_decode_logits_at_matches_full_prefill():
    """The prefill projects only each row's last prompt token; it equals gathering from full logits."""
    cfg = CFGS["gpt2"]
    params, prompts = _params(cfg), _prompts(cfg, B=2, P=4)
    positions = jnp.broadcast_to(jnp.arange(4), (2, 4))
    last_B = jnp.array([3, 0])
    full_BPV, cache_full = model.decode(cfg, params, prompts, positions, model.init_cache(cfg, 2, 8))
    some_B1V, cache_some = model.decode(
        cfg, params, prompts, positions, model.init_cache(cfg, 2, 8), logits_at_B=last_B
    )
    assert some_B1V.shape == (2, 1, cfg.vocab_size)
    np.testing.assert_allclose(some_B1V[:, 0], full_BPV[jnp.arange(2), last_B], atol=1e-6)
    np.testing.assert_array_equal(cache_some["k"], cache_full["k"])


def test_generation_reads_bf16_per_layer_weights_and_matches_either_layer_layout():
    """bf16 compute on fp32 params: decode_params casts the weight matrices once (norms and biases stay
    fp32) without changing a logit, and generation is the same for scanned and unrolled model configs."""
    cfg = model.ModelConfig.llama(
        vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, max_len=32, dtype="bfloat16"
    )
    unrolled = cfg.replace(scan_layers=False)
    params = _params(cfg)
    fast = sample.decode_params(unrolled, params)
    kinds = {a.ndim >= 2: a.dtype for a in jax.tree.leaves(fast)}
    assert kinds == {True: jnp.bfloat16, False: jnp.float32}
    prompts = _prompts(cfg, B=2, P=6)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    a, _ = model.decode(unrolled, fast, prompts, pos, model.init_cache(unrolled, 2, 12))
    b, _ = model.decode(
        unrolled, model.unstack_layers(unrolled, params), prompts, pos, model.init_cache(unrolled, 2, 12)
    )
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    outs = [
        sample.generate(c, params, prompts, jax.random.key(3), max_new_tokens=5, temperature=0.0)
        for c in (cfg.replace(scan_layers=True), unrolled)
    ]
    np.testing.assert_array_equal(np.asarray(outs[0]), np.asarray(outs[1]))
