"""LoRA: fresh adapters change nothing, training moves only adapters, merging is exact, dropout is plumbed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax import model as M
from gptjax.interop import lora
from gptjax.model import sharding

ALL = ("wq", "wk", "wv", "wo", "w_in", "w_gate", "w_out")
BASE = M.ModelConfig.llama(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_len=16
)
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 64, (4, 12)))


def base_params(cfg=BASE, seed=0):
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), M.param_shapes(cfg))


_apply = jax.jit(M.apply, static_argnums=0)


def logits(cfg, params, **kw):
    return _apply(cfg, params, TOKENS, **kw)


def lm_loss(cfg, params, dropout_rng=None):
    logits_BLV = M.apply(cfg, params, TOKENS[:, :-1], dropout_rng=dropout_rng)
    logp = jax.nn.log_softmax(logits_BLV)
    return -jnp.mean(jnp.take_along_axis(logp, TOKENS[:, 1:, None], -1))


def test_adapter_params_shapes_axes_and_config_checks():
    cfg = BASE.replace(lora_rank=4, lora_targets=ALL)
    shapes, axes = M.param_shapes(cfg), M.logical_axes(cfg)
    attn, mlp = shapes["blocks"]["attn"], shapes["blocks"]["mlp"]
    assert attn["wq_lora_a"].shape == (2, 32, 4) and attn["wq_lora_b"].shape == (2, 4, 4, 8)
    assert attn["wk_lora_b"].shape == (2, 4, 2, 8) and attn["wo_lora_a"].shape == (2, 4, 8, 4)
    assert mlp["w_gate_lora_b"].shape == (2, 4, 48) and mlp["w_out_lora_a"].shape == (2, 48, 4)
    assert axes["blocks"]["attn"]["wv_lora_b"] == ("layers", "lora_rank", "kv_heads", "head_dim")
    adapters, base = lora.split(shapes)
    assert len(jax.tree.leaves(adapters)) == 2 * len(ALL)
    assert jax.tree.structure(base) == jax.tree.structure(M.param_shapes(BASE))
    assert jax.tree.leaves(lora.adapter_mask(shapes)).count(True) == 2 * len(ALL)
    assert jax.tree.structure(lora.combine(adapters, base)) == jax.tree.structure(shapes)
    rm = M.param_shapes(cfg.replace(head="scalar"))
    trainable, frozen = lora.split(rm, also=("value_head", "value_bias"))
    assert {"value_head", "value_bias", "blocks"} == set(trainable) and "value_head" not in frozen
    assert jax.tree.structure(lora.combine(trainable, frozen)) == jax.tree.structure(rm)
    with pytest.raises(ValueError, match="lora_targets"):
        BASE.replace(lora_rank=4, lora_targets=("wq", "c_attn"))
    with pytest.raises(ValueError, match="w_gate"):
        M.ModelConfig.gpt2(lora_rank=4, lora_targets=("w_gate",))
    assert M.param_shapes(BASE.replace(lora_targets=ALL)) == M.param_shapes(BASE)  # rank 0 = off


def test_fresh_adapters_leave_outputs_unchanged():
    cfg = BASE.replace(lora_rank=4, lora_targets=ALL, lora_dropout=0.1)
    base = base_params()
    params = lora.add_adapters(cfg, base, jax.random.key(1))
    adapters, base2 = lora.split(params)
    assert all(float(jnp.abs(b).max()) == 0 for k, b in _items(adapters) if k.endswith("_lora_b']"))
    assert all(0.1 < float(jnp.std(a)) < 0.3 for k, a in _items(adapters) if k.endswith("_lora_a']"))
    jax.tree.map(np.testing.assert_array_equal, base2, base)
    np.testing.assert_array_equal(logits(cfg, params), logits(BASE, base))


def _items(tree):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_training_changes_only_adapters_and_merge_is_exact():
    cfg = BASE.replace(lora_rank=4, lora_alpha=8.0, lora_targets=ALL, lora_dropout=0.05)
    base = base_params()
    base["lm_head"] = base["lm_head"] * 5  # wide enough logits that adapters alone can fit the batch
    params = lora.add_adapters(cfg, base, jax.random.key(0))
    adapters, base = lora.split(params)
    base_before = jax.tree.map(np.array, base)
    opt = optax.adam(3e-2)
    opt_state = opt.init(adapters)

    @jax.jit
    def step(adapters, opt_state, rng):
        loss, grads = jax.value_and_grad(lambda a: lm_loss(cfg, lora.combine(a, base), rng))(adapters)
        updates, opt_state = opt.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    losses = []
    for i in range(40):
        adapters, opt_state, loss = step(adapters, opt_state, jax.random.key(i))
        losses.append(float(loss))
    trained = lora.combine(adapters, base)
    first, last = losses[0], float(jax.jit(lm_loss, static_argnums=0)(cfg, trained))
    assert last < first - 0.5, (first, last)
    jax.tree.map(np.testing.assert_array_equal, lora.split(trained)[1], base_before)  # bit-identical base
    assert all(float(jnp.abs(b).max()) > 1e-3 for k, b in _items(adapters) if k.endswith("_lora_b"))

    # Merge folds B @ A * alpha / r into W: a plain model with the same outputs.
    merged_cfg, merged = lora.merge(cfg, trained)
    assert merged_cfg == BASE.replace(lora_alpha=8.0, lora_targets=ALL, lora_dropout=0.05)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    unmerged_logits = logits(cfg, trained)
    np.testing.assert_allclose(logits(merged_cfg, merged), unmerged_logits, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(unmerged_logits - logits(BASE, base)).max()) > 0.1  # the adapters do matter
    # Untargeted weights are untouched by the merge.
    np.testing.assert_array_equal(merged["embed"], base["embed"])


def test_merge_matches_explicit_formula_for_every_target_shape():
    cfg = BASE.replace(lora_rank=3, lora_alpha=6.0, lora_targets=ALL)
    params = base_params(cfg, seed=1)
    _, merged = lora.merge(cfg, params)
    a, b = (
        params["blocks"]["attn"]["wo_lora_a"][1],
        params["blocks"]["attn"]["wo_lora_b"][1],
    )  # [H,E,R], [R,D]
    want = params["blocks"]["attn"]["wo"][1] + np.einsum("her,rd->hed", a, b) * 2.0
    np.testing.assert_allclose(merged["blocks"]["attn"]["wo"][1], want, atol=1e-6)
    a, b = (
        params["blocks"]["attn"]["wk_lora_a"][0],
        params["blocks"]["attn"]["wk_lora_b"][0],
    )  # [D,R], [R,K,E]
    want = params["blocks"]["attn"]["wk"][0] + np.einsum("dr,rke->dke", a, b) * 2.0
    np.testing.assert_allclose(merged["blocks"]["attn"]["wk"][0], want, atol=1e-6)
    np.testing.assert_allclose(
        logits(BASE.replace(lora_alpha=6.0, lora_targets=ALL), merged), logits(cfg, params), atol=1e-5
    )


def test_dropout_only_with_an_rng():
    cfg = BASE.replace(lora_rank=4, lora_targets=ALL, lora_dropout=0.5)
    params = base_params(cfg, seed=2)
    plain = logits(cfg, params)
    np.testing.assert_array_equal(logits(cfg, params), plain)
    d1 = logits(cfg, params, dropout_rng=jax.random.key(0))
    d2 = logits(cfg, params, dropout_rng=jax.random.key(1))
    assert float(jnp.abs(d1 - plain).max()) > 1e-3 and float(jnp.abs(d1 - d2).max()) > 1e-3
    np.testing.assert_array_equal(logits(cfg, params, dropout_rng=jax.random.key(0)), d1)
    # Dropout acts on the adapter input only: with B = 0 the rng changes nothing.
    zero_b = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if jax.tree_util.keystr(p).endswith("_lora_b']") else x, params
    )
    np.testing.assert_array_equal(logits(cfg, zero_b, dropout_rng=jax.random.key(0)), logits(cfg, zero_b))


def test_add_adapters_sharded_and_input_checks():
    cfg = BASE.replace(lora_rank=4, lora_targets=ALL)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = lora.add_adapters(cfg, base_params(), jax.random.key(0), mesh=mesh)
    want = lora.adapter_shardings(cfg, mesh)
    got = lora.split(params)[0]
    for x, s in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim)
    assert got["blocks"]["attn"]["wq_lora_b"].sharding.spec[2] == "tensor"  # heads split like wq
    with pytest.raises(ValueError, match="already hold adapters"):
        lora.add_adapters(cfg, params, jax.random.key(0))
    with pytest.raises(ValueError, match="lora_rank is 0"):
        lora.add_adapters(BASE, base_params(), jax.random.key(0))
    with pytest.raises(ValueError, match="missing"):
        lora.add_adapters(cfg, {k: v for k, v in base_params().items() if k != "lm_head"}, jax.random.key(0))


def test_kv_cache_decode_applies_adapters():
    cfg = BASE.replace(lora_rank=4, lora_targets=ALL)
    params = base_params(cfg, seed=4)
    B, L = TOKENS.shape
    positions_BL = jnp.broadcast_to(jnp.arange(L), (B, L))
    out, _ = jax.jit(M.decode, static_argnums=0)(cfg, params, TOKENS, positions_BL, M.init_cache(cfg, B, L))
    np.testing.assert_allclose(out, logits(cfg, params), atol=1e-5)
    assert float(jnp.abs(out - logits(BASE, lora.split(params)[1])).max()) > 1e-2
