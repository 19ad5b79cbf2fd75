"""Chunked LM-head terms (gptjax.losses.vocab): same values and gradients as whole logits, less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import model
from gptjax.losses import lm, vocab


def one_block(features_BLD, w_DV, targets_BL, temperature):
    """Whole fp32 logits: log p(target), entropy and argmax hits the plain way."""
    logits_BLV = jnp.einsum("bld,dv->blv", features_BLD, w_DV) / temperature
    logp_BLV = jax.nn.log_softmax(logits_BLV, axis=-1)
    return {
        "logp": lm.token_logprobs(logits_BLV, targets_BL),
        "entropy": -jnp.sum(jnp.exp(logp_BLV) * logp_BLV, axis=-1),
        "hit": (jnp.argmax(logits_BLV, -1) == targets_BL).astype(jnp.float32),
    }


def test_chunk_len_fits_the_budget():
    assert vocab.chunk_len(2, 4096, 128 * 1024, 256.0) == 256  # 2 x 256 x 128k x 4 B = 256 MiB
    assert vocab.chunk_len(8, 100, 512, 256.0) == 100  # fits: one chunk
    assert vocab.chunk_len(64, 100, 2**20, 1.0) == 1  # never below one position


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_terms_match_whole_logits_values_and_grads(temperature):
    B, L, D, V = 3, 10, 8, 50
    ks = jax.random.split(jax.random.key(0), 5)
    f = jax.random.normal(ks[0], (B, L, D))
    w = jax.random.normal(ks[1], (D, V))
    t = jax.random.randint(ks[2], (B, L), 0, V)
    t = jnp.where(jnp.arange(L) % 2 == 0, jnp.argmax(f @ w, -1), t)  # half the targets are the argmax
    c_logp, c_ent = jax.random.normal(ks[3], (B, L)), jax.random.normal(ks[4], (B, L))
    # 3 positions per chunk: 4 chunks, the last one padded
    budget = 3 * B * V * 4 / 2**20
    assert vocab.chunk_len(B, L, V, budget) == 3

    def objective(terms_fn):
        def f_(f, w):
            out = terms_fn(f, w)
            return jnp.sum(out["logp"] * c_logp) + jnp.sum(out["entropy"] * c_ent), out

        return jax.jit(jax.value_and_grad(f_, (0, 1), has_aux=True))

    chunked = objective(
        lambda f, w: vocab.head_terms(f, w, t, temperature=temperature, entropy=True, budget_mb=budget)
    )
    whole = objective(lambda f, w: one_block(f, w, t, temperature))
    (got, got_terms), got_grads = chunked(f, w)
    (want, want_terms), want_grads = whole(f, w)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for k in ("logp", "entropy", "hit"):
        assert got_terms[k].shape == (B, L)
        np.testing.assert_allclose(got_terms[k], want_terms[k], rtol=1e-5, atol=1e-5)
    assert 0.0 < float(jnp.mean(got_terms["hit"])) < 1.0
    for g, r in zip(got_grads, want_grads, strict=True):
        assert float(jnp.abs(r).max()) > 0.1
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # tied and untied LM heads
def test_lm_loss_chunked_equals_one_chunk(family):
    make = model.ModelConfig.gpt2 if family == "gpt2" else model.ModelConfig.llama
    cfg = make(vocab_size=97, d_model=32, n_layers=1, n_heads=2, max_len=16)
    params = model.init(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 17), 0, 97)
    batch = {
        "inputs_BL": tokens[:, :-1],
        "targets_BL": tokens[:, 1:],
        "weights_BL": (jax.random.uniform(jax.random.key(3), (2, 16)) > 0.3).astype(jnp.float32),
    }

    class Ctx:
        def __init__(self, cfg):
            self.model_cfg = cfg

    def run(cfg):
        loss = lambda p: lm.loss_fn(p, batch, jax.random.key(0), Ctx(cfg))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    tiny_budget = 5 * 2 * 97 * 4 / 2**20  # 5 positions per chunk
    (loss_c, m_c), g_c = run(cfg.replace(logits_chunk_mb=tiny_budget))
    (loss_w, m_w), g_w = run(cfg)
    # the one-chunk loss is the plain cross-entropy of model.apply's logits
    logits = model.apply(cfg, params, batch["inputs_BL"])
    plain = -jnp.sum(lm.token_logprobs(logits, batch["targets_BL"]) * batch["weights_BL"])
    np.testing.assert_allclose(loss_w, plain, rtol=1e-5)
    np.testing.assert_allclose(loss_c, loss_w, rtol=1e-5)
    np.testing.assert_allclose(m_c["accuracy"][0], m_w["accuracy"][0])
    for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_w), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_loss_never_holds_the_whole_logits():
    """The compiled gradient's scratch memory stays far below the [B, L, V] fp32 logits it would need."""
    B, L, D, V = 2, 256, 64, 32768
    logits_bytes = B * L * V * 4  # 64 MiB
    f = jax.ShapeDtypeStruct((B, L, D), jnp.float32)
    w = jax.ShapeDtypeStruct((D, V), jnp.float32)
    t = jax.ShapeDtypeStruct((B, L), jnp.int32)

    def temp_bytes(budget_mb):
        def loss(f, w, t):
            return -jnp.sum(vocab.head_terms(f, w, t, budget_mb=budget_mb)["logp"])

        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(f, w, t).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(1024.0), temp_bytes(4.0)
    assert whole >= logits_bytes  # one chunk: the logits (and their gradient) exist at once
    # a 4 MiB chunk: its logits and their gradient, plus the [D, V] weight gradient (8 MiB) being summed
    assert chunked < logits_bytes / 3, (chunked, whole)


def _dots(jaxpr, found):
    """Every dot_general in a jaxpr and its sub-jaxprs (scan, remat, custom VJP, pjit), not Pallas kernels."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(
                (tuple(str(v.aval.dtype) for v in eqn.invars), tuple(v.aval.shape for v in eqn.invars))
            )
        if eqn.primitive.name == "pallas_call":
            continue
        for p in eqn.params.values():
            for j in p if isinstance(p, (tuple, list)) else (p,):
                j = getattr(j, "jaxpr", j)  # a closed jaxpr's jaxpr (custom VJP rules hold callables)
                if hasattr(j, "eqns"):
                    _dots(j, found)
    return found


@pytest.mark.parametrize("chunked", [False, True])
def test_bf16_model_trains_with_bf16_matmuls_only(chunked):
    """A bf16 model with fp32 params: every matmul of the loss and its gradient (model, LM head, both
    backward products) takes bf16 operands. An fp32 product in the backward pass (the logits' fp32 cotangent
    meeting the bf16 head) ran as a TF32 GEMM on an H100 and cost a third of a llama_1b step."""
    cfg = model.ModelConfig.llama(
        vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=16, dtype="bfloat16"
    )
    if chunked:
        cfg = cfg.replace(logits_chunk_mb=5 * 2 * 97 * 4 / 2**20)
    params = model.init(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (2, 17), 0, 97)
    batch = {"inputs_BL": tokens[:, :-1], "targets_BL": tokens[:, 1:], "weights_BL": jnp.ones((2, 16))}

    class Ctx:
        model_cfg = cfg

    loss = lambda p: lm.loss_fn(p, batch, jax.random.key(0), Ctx())[0]  # noqa: E731
    dots = _dots(jax.make_jaxpr(jax.grad(loss))(params).jaxpr, [])
    assert len(dots) >= 3 * 2 * 4  # forward and two backward products of each layer's matmuls at least
    head = [d for d in dots if 97 in d[1][0] + d[1][1]]
    assert len(head) >= 3, head  # the LM head's forward, d features and d head were found
    assert all(dt == ("bfloat16", "bfloat16") for dt, _ in dots), [
        d for d in dots if d[0] != ("bfloat16",) * 2
    ]
    grads = jax.grad(loss)(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
