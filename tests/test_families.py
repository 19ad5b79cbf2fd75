"""Qwen3, Gemma 2, Gemma 3 and sliding windows (Mistral, Qwen2): our logits and greedy tokens equal
transformers' on tiny random models (every weight perturbed off its init, norms included, so a wrong norm
convention fails), exports load back in transformers; the window in the reference attention, the decode
path and the Pallas kernels (interpreted) against plain-jnp references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from gptjax import model as M
from gptjax.interop import hf
from gptjax.kernels import decode_attention as da
from gptjax.kernels import flash_attention as fa
from gptjax.model import attention, sample

V, P, T = 300, 6, 9  # prompts of P tokens, T new ones: the sequences run well past the window of 4
COMMON = {
    "vocab_size": V,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 32,
    "initializer_range": 0.1,
}
CONFIGS = {
    "qwen3": lambda: transformers.Qwen3Config(
        **COMMON,
        rope_theta=100.0,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=["full_attention", "sliding_attention"],
        tie_word_embeddings=True,
    ),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=4),
    "qwen2": lambda: transformers.Qwen2Config(
        **COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1
    ),
    "gemma2": lambda: transformers.Gemma2Config(
        **COMMON,
        sliding_window=4,
        query_pre_attn_scalar=24,  # not head_dim: the query scaling is tested
        attn_logit_softcapping=2.0,  # small caps: the tanh is far from linear on these scores
        final_logit_softcapping=3.0,
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **COMMON,
        sliding_window=4,
        query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 300.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
        },
    ),
}
FAMILY = {"qwen3": "qwen3", "mistral": "llama", "qwen2": "llama", "gemma2": "gemma2", "gemma3": "gemma3"}


@functools.cache
def hf_model(kind: str):
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind](), attn_implementation="eager").eval()
    with torch.no_grad():  # norms far from 0 (Gemma's init) and from 1 (LLaMA's): a (1 + w) slip shows
        for name, p in m.named_parameters():
            p.add_((0.5 if "norm" in name else 0.05) * torch.randn_like(p))
    m.generation_config.eos_token_id = None  # greedy runs all T steps
    m.generation_config.pad_token_id = 0
    return m


def torch_logits(m, tokens) -> np.ndarray:
    with torch.no_grad():
        return m(torch.tensor(np.asarray(tokens))).logits.float().numpy()


TOKENS = np.random.RandomState(0).randint(0, V, (2, P + T))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_logits_greedy_tokens_and_export_match_transformers(kind, tmp_path):
    m = hf_model(kind)
    m.save_pretrained(tmp_path / "src")
    cfg, params = hf.load(tmp_path / "src")
    assert cfg.family == FAMILY[kind] and cfg.sliding_window == 4 and any(cfg.local_layers)
    theirs = torch_logits(m, TOKENS)
    ours = np.asarray(jax.jit(M.apply, static_argnums=0)(cfg, params, jnp.asarray(TOKENS)))
    assert np.abs(theirs).max() > 0.5  # a real comparison, not two near-zero outputs
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

    # Greedy decoding through the KV cache (prefill, then one token at a time past the window).
    prompts = TOKENS[:, :P]
    with torch.no_grad():
        want = m.generate(torch.tensor(prompts), max_new_tokens=T, do_sample=False)[:, P:].numpy()
    got = sample.generate(
        cfg, params, jnp.asarray(prompts), jax.random.key(0), max_new_tokens=T, temperature=0
    )
    np.testing.assert_array_equal(np.asarray(got), want)

    hf.save(cfg, params, tmp_path / "dst")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()
    assert type(back) is type(m)
    np.testing.assert_allclose(torch_logits(back, TOKENS), theirs, atol=1e-5, rtol=0)
    assert hf.load(tmp_path / "dst")[0] == cfg


def test_scanned_mixed_layers_match_unrolled(tmp_path):
    """Scanned layers that mix local and global attention (one compiled body: a traced window and rope base)
    compute what the unrolled layers do (HF parity above runs unrolled); a model made from the preset (not
    imported) exports to transformers with the same logits."""
    cfg = M.ModelConfig.gemma3(
        vocab_size=V, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, sliding_window=3, max_len=32,
        layer_types=("local", "global"), rope_theta=100.0, rope_local_theta=10.0, scan_layers=False,
    )  # fmt: skip
    rng = np.random.RandomState(0)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), M.param_shapes(cfg))
    apply = jax.jit(M.apply, static_argnums=0)
    unrolled = apply(cfg, params, jnp.asarray(TOKENS))
    scanned = apply(cfg.replace(scan_layers=True), params, jnp.asarray(TOKENS))
    np.testing.assert_allclose(scanned, unrolled, atol=2e-5)
    hf.save(cfg, params, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    np.testing.assert_allclose(torch_logits(back, TOKENS), unrolled, atol=1e-4, rtol=0)


def test_xla_attention_window_and_softcap_match_reference():
    """The model's attention (chunked scores, hand-written backward) with a window and a soft-cap: values
    and gradients equal autodiff of the plain reference; so does the cached (decode) attention."""
    ks = jax.random.split(jax.random.key(0), 4)
    q, do = jax.random.normal(ks[0], (2, 256, 2, 8)), jax.random.normal(ks[3], (2, 256, 2, 8))
    k, v = jax.random.normal(ks[1], (2, 256, 1, 8)), jax.random.normal(ks[2], (2, 256, 1, 8))

    @jax.jit
    def both(window):  # traced, as in scanned layers that mix local and global attention
        out, vjp = jax.vjp(functools.partial(attention.attention, window=window, softcap=3.0), q, k, v)
        ref = functools.partial(fa.flash_attention_reference, window=window, softcap=3.0)
        out_r, vjp_r = jax.vjp(ref, q, k, v)
        return (out, *vjp(do)), (out_r, *vjp_r(do))

    for got, want in zip(*both(jnp.int32(70)), strict=True):  # L = 256: four query chunks
        np.testing.assert_allclose(got, want, atol=1e-5)
    ref = jax.jit(functools.partial(fa.flash_attention_reference, softcap=3.0))

    # Decode: a query at slot 40 sees slots 36..40 through a window of 5, in the reference and the kernel.
    kc, vc = jnp.transpose(k[:, :64], (0, 2, 3, 1)), jnp.swapaxes(v[:, :64], 1, 2)
    pos = jnp.array([[40], [9]])
    got = jax.jit(functools.partial(attention.cached_attention, window=5, softcap=3.0))(q[:, :1], kc, vc, pos)
    rows = [
        (q[b : b + 1, :1], k[b : b + 1, p - 4 : p + 1], v[b : b + 1, p - 4 : p + 1])
        for b, p in [(0, 40), (1, 9)]
    ]
    want = jnp.concatenate([ref(*row) for row in rows])
    np.testing.assert_allclose(got, want, atol=1e-5)
    starts = jnp.array([36, 5], jnp.int32)
    kernel = jax.jit(functools.partial(da.decode_attention, softcap=3.0, block_k=16))(
        q[:, 0], kc, vc, pos[:, 0] + 1, starts_B=starts
    )
    np.testing.assert_allclose(kernel, want[:, 0], atol=1e-5)


def test_flash_kernel_window_skips_blocks_and_matches_reference():
    """The Pallas kernel (interpreted) with a window and a soft-cap: forward and gradients equal the
    reference, and blocks entirely behind the window are never visited."""
    B, L, H, K, D, W = 1, 64, 2, 1, 16, 20
    ks = jax.random.split(jax.random.key(1), 4)
    q, do = jax.random.normal(ks[0], (B, L, H, D)), jax.random.normal(ks[3], (B, L, H, D))
    k, v = jax.random.normal(ks[1], (B, L, K, D)), jax.random.normal(ks[2], (B, L, K, D))
    small = fa.BlockSizes(16, 16, 16, 16, 16, 16)
    kernel = functools.partial(fa.flash_attention, window=W, softcap=3.0, block_sizes=small)
    ref = functools.partial(fa.flash_attention_reference, window=W, softcap=3.0)

    @jax.jit
    def both(q, k, v, do):
        out, vjp = jax.vjp(kernel, q, k, v)
        out_r, vjp_r = jax.vjp(ref, q, k, v)
        return out, vjp(do), out_r, vjp_r(do)

    out, grads, out_r, grads_r = both(q, k, v, do)
    np.testing.assert_allclose(out, out_r, atol=1e-5)
    for g, g_r in zip(grads, grads_r, strict=True):
        np.testing.assert_allclose(g, g_r, atol=1e-5)

    ranges = fa.block_ranges(
        n_rows=L, n_cols=L, br=16, bc=16, nr=4, nc=4, rows_are_q=True, causal=True, offset=0, window=W
    ).reshape(4, 4)
    # Query block 3 (rows 48..63) sees keys 29..63: blocks 1 to 3, each partly masked; block 0 is skipped.
    assert ranges[3].tolist() == [1, 1, 1, 4]
    assert ranges[0].tolist() == [0, 0, 0, 1]


def test_training_log_probs_apply_gemma2s_final_softcap():
    """The losses' chunked LM-head terms (log-probs, entropy and their gradients) carry the final soft-cap,
    so a Gemma 2 policy is trained on, and PPO scores with, the distribution it samples from."""
    from gptjax.losses import vocab

    cfg = M.ModelConfig.gemma2(
        vocab_size=V, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, max_len=32, final_softcap=3.0,
    )  # fmt: skip
    rng = np.random.RandomState(1)
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), s.dtype), M.param_shapes(cfg))
    tokens = jnp.asarray(TOKENS[:, :-1])
    targets = jnp.asarray(TOKENS[:, 1:])

    def ours(p):
        t = vocab.lm_terms(cfg, p, tokens, targets, temperature=0.7, entropy=True)
        return jnp.sum(t["logp"]) + jnp.sum(t["entropy"]), t

    def reference(p):
        logp = jax.nn.log_softmax(M.apply(cfg, p, tokens).astype(jnp.float32) / 0.7, axis=-1)
        ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        return jnp.sum(jnp.take_along_axis(logp, targets[..., None], -1)) + jnp.sum(ent), logp

    (v, t), g = jax.value_and_grad(ours, has_aux=True)(params)
    (v_ref, logp), g_ref = jax.value_and_grad(reference, has_aux=True)(params)
    assert float(jnp.max(jnp.abs(M.apply(cfg, params, tokens)))) < 3.0  # the cap is in the logits
    want = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(t["logp"], want, atol=2e-5)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
