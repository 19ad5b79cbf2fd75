"""A quantised frozen base (QLoRA): NF4 against a plain-numpy reference, the quantised params tree and its
abstract shapes and shardings, the model on it (apply, scanned and unrolled, decode, generate) against the
same model on the dequantised dense base, LoRA gradients through it, its bytes, and the backward pass of a
scanned model holding one layer's dequantised weights at a time."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gptjax import model
from gptjax.interop import lora
from gptjax.model import quant, sample, sharding

ALL = ("wq", "wk", "wv", "wo", "w_in", "w_gate", "w_out")
CFG = model.ModelConfig.llama(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_len=24
)
GROUP = 16  # 2 groups over d_model, 3 over d_ff
TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)))
_apply = jax.jit(model.apply, static_argnums=0)


def random_params(cfg, seed=0):
    """Normal weights (scale 0.1) drawn on the host; norm scales 1."""
    r = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(
            np.ones(s.shape) if "scale" in jax.tree_util.keystr(path) else r.normal(0, 0.1, s.shape), s.dtype
        ),
        model.param_shapes(cfg),
    )


def test_nf4_against_the_reference_with_known_values():
    levels = quant.NF4_LEVELS
    w = np.random.default_rng(0).normal(0, 0.05, (2, 32, 5)).astype(np.float32)  # [layers, I, O]
    w[0, :16, 0] = 2.0 * levels  # a group whose values are its levels times absmax 2: codes 0..15, exact
    qt = quant.quantize_nf4(w, group_size=16)
    assert qt.packed.dtype == np.uint8 and qt.packed.shape == (2, 16, 5) and qt.scale.shape == (2, 2, 5)
    codes = np.asarray(quant.unpack_nibbles(qt.packed))
    np.testing.assert_array_equal(codes[0, :16, 0], np.arange(16))
    back = np.asarray(quant.dequantize(qt, np.float32))
    np.testing.assert_array_equal(back[0, :16, 0], 2.0 * levels)
    for layer in range(2):  # nearest level of w / absmax, group by group
        w_G = w[layer].reshape(2, 16, 5)
        absmax = np.abs(w_G).max(axis=1).astype(np.float16)
        x = w_G / absmax.astype(np.float32)[:, None, :]
        want = np.abs(x[..., None] - levels).argmin(-1).reshape(32, 5)
        np.testing.assert_array_equal(codes[layer], want)
        np.testing.assert_array_equal(np.asarray(qt.scale[layer]), absmax)
    gaps = np.diff(levels).max() / 2  # error below half the widest gap between levels, times absmax
    assert np.all(np.abs(back - w) <= gaps * np.repeat(np.asarray(qt.scale, np.float32), 16, axis=1) + 1e-7)
    assert quant.quant_bytes(qt) == 2 * 32 * 5 // 2 + 2 * 2 * 5 * 2


@pytest.mark.parametrize("mode", quant.MODES)
def test_quantized_tree_and_its_abstract_shapes(mode):
    cfg = CFG.replace(lora_rank=4, lora_targets=ALL)
    adapters, base = lora.split(random_params(cfg))
    qbase = quant.quantize_base(cfg, lora.combine(adapters, base), mode, GROUP)
    for name, m in quant.matrices(cfg).items():
        qt = quant.get(qbase, m.path)
        assert isinstance(qt, {"int8": quant.Int8, "int4": quant.Int4, "nf4": quant.NF4}[mode])
        w_IO = quant.as_matrix(quant.get(base, m.path), m)  # its own weight's matrix view, to half a step
        half_step = {"int8": 1 / 254, "int4": 1 / 14, "nf4": np.diff(quant.NF4_LEVELS).max() / 2}[mode]
        np.testing.assert_allclose(quant.dequantize(qt), w_IO, atol=half_step * np.abs(w_IO).max() + 1e-6)
        assert quant.get(qbase, (*m.path[:-1], f"{name}_lora_a")) is quant.get(
            adapters, (*m.path[:-1], f"{name}_lora_a")
        )
    assert (
        qbase["embed"] is base["embed"]
        and qbase["blocks"]["attn_norm"]["scale"] is base["blocks"]["attn_norm"]["scale"]
    )

    got = quant.quantize_base(cfg, base, mode, GROUP)  # the frozen base alone: what the shapes describe
    want = quant.quantized_base_shapes(cfg, mode, GROUP)
    flat = lambda t: {
        jax.tree_util.keystr(p): (x.shape, x.dtype) for p, x in jax.tree_util.tree_flatten_with_path(t)[0]
    }
    assert flat(got) == flat(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)


def test_quantized_base_shardings_place_and_run():
    cfg = CFG.replace(lora_rank=4)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    base = lora.split(random_params(cfg))[1]
    qbase = quant.quantize_base(cfg, base, "int4", GROUP)
    shardings = quant.quantized_base_shardings(cfg, mesh, "int4", GROUP)
    placed = jax.device_put(qbase, shardings)
    on_mesh = quant.quantize_base(cfg, base, "int4", GROUP, mesh=mesh)
    for m in quant.matrices(cfg).values():  # the quantised weights placed; the rest is as it was given
        got, want = jax.tree.leaves(quant.get(on_mesh, m.path)), jax.tree.leaves(quant.get(shardings, m.path))
        assert all(x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(got, want, strict=True))
    wq, wo = placed["blocks"]["attn"]["wq"], placed["blocks"]["attn"]["wo"]
    assert wq.packed.sharding.spec == P(None, "fsdp", "tensor")  # [N, D/2, H*E]: embed, heads
    assert wq.scale.sharding.spec == P(None, "fsdp", "tensor")  # [N, D/g = 2, H*E]
    assert wo.packed.sharding.spec == P(None, "tensor", "fsdp")  # [N, H*E/2, D]: heads, embed
    assert placed["embed"].sharding.spec == model.param_shardings(cfg, mesh)["embed"].spec
    int8 = jax.device_put(
        quant.quantize_base(cfg, base, "int8"), quant.quantized_base_shardings(cfg, mesh, "int8")
    )
    assert int8["blocks"]["attn"]["wq"].scale.sharding.spec == P(None, None, "tensor")  # [N, 1, H*E]
    adapters = lora.split(random_params(cfg, seed=1))[0]
    np.testing.assert_allclose(
        _apply(cfg, lora.combine(adapters, placed), TOKENS),
        _apply(cfg, lora.combine(adapters, qbase), TOKENS),
        atol=1e-5,
    )


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("mode", quant.MODES)
def test_apply_on_a_quantized_base_equals_the_dequantized_model(mode, scan):
    cfg = CFG.replace(scan_layers=scan)
    params = random_params(cfg)
    qparams = quant.quantize_base(cfg, params, mode, GROUP)
    dense = quant.dequantize_base(cfg, qparams)
    got = np.asarray(_apply(cfg, qparams, TOKENS))
    np.testing.assert_allclose(got, _apply(cfg, dense, TOKENS), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(
        dense["blocks"]["mlp"]["w_out"], quant.round_trip(cfg, params, mode, GROUP)["blocks"]["mlp"]["w_out"]
    )
    assert np.abs(got - np.asarray(_apply(cfg, params, TOKENS))).max() > 1e-4  # quantisation is not a no-op


def test_decode_and_greedy_generation_on_a_quantized_base():
    cfg = CFG.replace(scan_layers=True)
    qparams = quant.quantize_base(cfg, random_params(cfg, seed=2), "nf4", GROUP)
    dense = quant.dequantize_base(cfg, qparams)
    prompts = TOKENS[:, :6]
    positions = jnp.broadcast_to(jnp.arange(6), prompts.shape)
    decode = jax.jit(model.decode, static_argnames=("cfg", "prefill"))
    got, cache = decode(cfg, qparams, prompts, positions, model.init_cache(cfg, 2, 8), prefill=True)
    want, want_cache = decode(cfg, dense, prompts, positions, model.init_cache(cfg, 2, 8), prefill=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(cache["k"], want_cache["k"], atol=1e-5)

    lengths = jnp.asarray([6, 4])
    gen = lambda p: sample.generate(
        cfg, p, prompts, jax.random.key(0), max_new_tokens=6, prompt_lengths_B=lengths, temperature=0.0
    )
    tokens = np.asarray(gen(qparams))
    np.testing.assert_array_equal(tokens, gen(dense))
    assert len(np.unique(tokens)) > 1


@pytest.mark.parametrize("scan", [True, False])
def test_lora_gradients_through_a_quantized_base(scan):
    cfg = CFG.replace(lora_rank=4, lora_targets=ALL, scan_layers=scan)
    base = random_params(CFG, seed=3)
    adapters = lora.split(lora.add_adapters(cfg, base, jax.random.key(0)))[0]  # B = 0: the base's function
    qbase = quant.quantize_base(cfg, base, "int4", GROUP)
    dense = quant.dequantize_base(cfg, qbase)

    def loss(adapters, base):
        logp = jax.nn.log_softmax(model.apply(cfg, lora.combine(adapters, base), TOKENS[:, :-1]))
        return -jnp.mean(jnp.take_along_axis(logp, TOKENS[:, 1:, None], -1))

    grad = jax.jit(jax.grad(loss))
    g, g_dense = grad(adapters, qbase), grad(adapters, dense)
    attn = g["blocks"]["attn"]
    assert np.all(np.asarray(attn["wq_lora_a"]) == 0)  # B = 0: nothing reaches A yet
    assert np.abs(attn["wq_lora_b"]).max() > 0 and np.abs(g["blocks"]["mlp"]["w_out_lora_b"]).max() > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g, g_dense)

    stepped = jax.tree.map(lambda p, d: p - 1.0 * d, adapters, g)  # one SGD step: B moves, then A has a grad
    g, g_dense = grad(stepped, qbase), grad(stepped, dense)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(g))
    assert (
        np.abs(g["blocks"]["attn"]["wq_lora_a"]).max() > 0
        and np.abs(g["blocks"]["mlp"]["w_in_lora_a"]).max() > 0
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4), g, g_dense)


def test_quantized_base_bytes():
    cfg = model.ModelConfig.llama(vocab_size=64, d_model=256, n_layers=2, n_heads=4, d_ff=1024, max_len=16)
    params = jax.tree.map(
        lambda s: np.zeros(s.shape, s.dtype), model.param_shapes(cfg)
    )  # fp32, blocks dominate
    dense = quant.quant_bytes(params)
    for mode, bound in (("int8", 0.3), ("int4", 0.18), ("nf4", 0.18)):
        shapes = quant.quantized_base_shapes(cfg, mode)
        ratio = quant.quant_bytes(shapes) / dense
        assert ratio < bound, (mode, ratio)
        assert quant.quant_bytes(quant.quantize_base(cfg, params, mode)) == quant.quant_bytes(shapes)
    assert (
        quant.quant_bytes(quant.quantized_base_shapes(cfg, "int4"))
        < quant.quant_bytes(quant.quantized_base_shapes(cfg, "int8")) * 0.6
    )


def test_scanned_backward_never_holds_the_dequantized_stack():
    """The gradient of a scanned model over its adapters needs each layer's weights again: they are
    dequantised per layer in the backward pass, not saved from the forward one (the stack would be a dense
    base). XLA's buffer assignment for the compiled step shows it."""
    cfg = model.ModelConfig.llama(
        vocab_size=64, d_model=128, n_layers=8, n_heads=4, d_ff=256, max_len=16, scan_layers=True, lora_rank=2
    )
    adapters, base = lora.split(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), model.param_shapes(cfg)))
    qbase = quant.quantize_base(cfg, base, "int8")
    tokens = jnp.zeros((1, 8), jnp.int32)
    loss = lambda adapters, base: jnp.sum(model.apply(cfg, lora.combine(adapters, base), tokens) ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(adapters, qbase).compile()
    stack = sum(quant.quant_bytes(quant.get(base, m.path)) for m in quant.matrices(cfg).values())
    assert compiled.memory_analysis().temp_size_in_bytes < stack / 3
