"""Hugging Face interop: our logits equal transformers' for tiny random GPT-2 / OPT / LLaMA-family models,
saved checkpoints load back in transformers, sharded loading, clear refusals of what we can't represent."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from gptjax import model as M
from gptjax.interop import hf, lora
from gptjax.model import sharding

V = 96  # divisible by the tensor axis, so the sharded test splits the vocab too
TOKENS = np.random.RandomState(0).randint(0, V, (2, 11))


def hf_config(kind: str, tied: bool):
    common = {"vocab_size": V, "tie_word_embeddings": tied}
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=16, **common)
    if kind == "opt":
        return transformers.OPTConfig(
            hidden_size=32,
            word_embed_proj_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=64,
            max_position_embeddings=16,
            **common,
        )
    llama = {
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        **common,
    }
    if kind == "llama":
        return transformers.LlamaConfig(rope_theta=500.0, **llama)
    if (
        kind == "llama3"
    ):  # Llama 3.1 long-context rope scaling; the test sequence runs past the original length
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        return transformers.LlamaConfig(rope_parameters=rope, **llama)
    if kind == "linear":
        return transformers.LlamaConfig(
            rope_parameters={"rope_type": "linear", "rope_theta": 100.0, "factor": 4.0}, **llama
        )
    if kind == "qwen2":  # LLaMA with q/k/v biases
        return transformers.Qwen2Config(**llama)
    if kind == "mistral":  # GQA with 1 kv head and head_dim != hidden / heads
        return transformers.MistralConfig(
            **{**llama, "num_key_value_heads": 1}, head_dim=16, sliding_window=None
        )
    raise ValueError(kind)


def hf_model(kind: str, tied: bool):
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(hf_config(kind, tied)).eval()
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1: perturb so every tensor matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def torch_logits(m, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return m(torch.tensor(tokens)).logits.float().numpy()


def random_params(cfg, seed=0, std=0.05):
    """Params of the right shapes without model.init's compile (the tests here exercise conversion)."""
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape), s.dtype), M.param_shapes(cfg))


def our_logits(cfg, params, tokens=TOKENS) -> np.ndarray:
    return np.asarray(jax.jit(lambda p, t: M.apply(cfg, p, t))(params, jnp.asarray(tokens)))


CASES = [
    ("gpt2", True),
    ("gpt2", False),
    ("opt", True),
    ("opt", False),
    ("llama", True),
    ("llama", False),
    ("qwen2", True),
    ("mistral", False),
    ("llama3", True),
    ("linear", False),
]


@pytest.mark.parametrize("kind,tied", CASES, ids=[f"{k}-{'tied' if t else 'untied'}" for k, t in CASES])
def test_logits_match_transformers_both_ways(kind, tied, tmp_path):
    m = hf_model(kind, tied)
    src, dst = tmp_path / "src", tmp_path / "dst"
    # Sharded checkpoints (an index + several files) for half the cases.
    m.save_pretrained(src, max_shard_size="20KB" if tied else "1GB")
    assert os.path.isfile(src / "model.safetensors.index.json") == tied

    cfg, params = hf.load(src)
    assert cfg.tie_embeddings == tied and cfg.family == (
        "gpt2" if kind == "gpt2" else "opt" if kind == "opt" else "llama"
    )
    assert cfg.rope_scaling == {"llama3": "llama3", "linear": "linear"}.get(kind, "none")
    ours, theirs = our_logits(cfg, params), torch_logits(m)
    np.testing.assert_array_less(np.abs(ours - theirs).max(), 1e-4)
    assert np.abs(theirs).max() > 0.1  # a real comparison, not two near-zero outputs

    hf.save(cfg, params, dst, max_shard_bytes=30_000 if not tied else 2**30)
    assert os.path.isfile(dst / "model.safetensors.index.json") == (not tied)
    back = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    # Mistral without a sliding window is LLaMA; it comes back as LLaMA.
    assert type(back).__name__ == ("LlamaForCausalLM" if kind == "mistral" else type(m).__name__)
    np.testing.assert_array_less(np.abs(torch_logits(back) - theirs).max(), 1e-4)
    cfg2, params2 = hf.load(dst)
    assert cfg2 == cfg
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_load_streams_into_sharded_layout(tmp_path, monkeypatch):
    m = hf_model("llama", tied=False)
    m.save_pretrained(tmp_path, max_shard_size="20KB")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    reads = []
    get = hf.TensorReader.get
    monkeypatch.setattr(hf.TensorReader, "get", lambda self, name: reads.append(name) or get(self, name))
    cfg, params = hf.load(tmp_path, mesh=mesh)
    assert sorted(reads) == sorted(m.state_dict())  # every tensor read exactly once, for all 8 devices
    monkeypatch.undo()
    _, ref = hf.load(tmp_path)
    want = M.param_shardings(cfg, mesh)
    for (path, x), s, r in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree.leaves(want),
        jax.tree.leaves(ref),
        strict=True,
    ):
        assert x.sharding.is_equivalent_to(s, x.ndim), path
        for shard in x.addressable_shards:  # each device holds only its own slice
            assert shard.data.shape == s.shard_shape(x.shape), path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(r))
    split = [p for p in jax.tree.leaves(params) if p.addressable_shards[0].data.size < p.size]
    assert len(split) >= 8  # embed, lm_head and the stacked attention / MLP weights are really split
    with jax.set_mesh(mesh):
        ours = our_logits(cfg, params)
    np.testing.assert_array_less(np.abs(ours - torch_logits(m)).max(), 1e-4)
    hf.save(cfg, params, tmp_path / "out")  # straight from the sharded arrays
    _, again = hf.load(tmp_path / "out")
    jax.tree.map(np.testing.assert_array_equal, again, ref)


def test_bfloat16_checkpoint_keeps_its_dtype(tmp_path):
    m = hf_model("llama", tied=True).to(torch.bfloat16)
    m.save_pretrained(tmp_path)
    cfg, params = hf.load(tmp_path)
    assert cfg.param_dtype == "bfloat16" and cfg.dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    want = m.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(params["blocks"]["mlp"]["w_out"][1], np.float32), want)
    cfg32, params32 = hf.load(tmp_path, dtype="float32")
    assert cfg32.param_dtype == "float32" and params32["embed"].dtype == jnp.float32
    hf.save(cfg, params, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert back.dtype == torch.bfloat16
    torch.testing.assert_close(
        back.model.layers[1].mlp.down_proj.weight, m.model.layers[1].mlp.down_proj.weight
    )


def test_base_model_checkpoint_without_prefix(tmp_path):
    m = hf_model("gpt2", tied=True)
    m.transformer.save_pretrained(tmp_path)  # GPT2Model: 'h.0...' names, no 'transformer.' prefix
    cfg, params = hf.load(tmp_path)
    np.testing.assert_array_less(np.abs(our_logits(cfg, params) - torch_logits(m)).max(), 1e-4)


def test_merged_lora_model_exports(tmp_path):
    cfg = M.ModelConfig.llama(
        vocab_size=V,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=48,
        lora_rank=4,
        lora_targets=("wq", "wk", "wv", "wo", "w_in", "w_gate", "w_out"),
    )
    params = random_params(cfg)  # trained-looking adapters: B != 0
    hf.save(cfg, params, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = our_logits(cfg, params)
    assert np.abs(ours - our_logits(cfg.replace(lora_rank=0), lora.split(params)[1])).max() > 1e-3
    np.testing.assert_array_less(np.abs(torch_logits(back) - ours).max(), 1e-4)


# ----------------------------------------------------------------------------------------------------
# Refusals


def write_config(path, kind, **changes):
    os.makedirs(path, exist_ok=True)
    d = hf_config(kind, tied=True).to_dict()
    d.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)


REFUSED = [
    ("opt", {"do_layer_norm_before": False}, "do_layer_norm_before"),
    ("opt", {"word_embed_proj_dim": 16}, "word_embed_proj_dim"),
    ("opt", {"activation_function": "silu"}, "activation_function"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", {"activation_function": "swish"}, "activation_function"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}}, "rope_type"),
    ("llama", {"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "beta_fast": 3}}, "beta_fast"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"model_type": "bert"}, "model_type"),
]


@pytest.mark.parametrize("kind,changes,field", REFUSED, ids=[r[2] + "-" + r[0] for r in REFUSED])
def test_refuses_configs_it_cannot_represent(kind, changes, field, tmp_path):
    write_config(tmp_path, kind, **changes)
    with pytest.raises(ValueError, match=field):
        hf.load(tmp_path)


def test_missing_extra_and_misshapen_tensors_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    hf_model("opt", tied=True).save_pretrained(tmp_path / "good")
    tensors = load_file(tmp_path / "good" / "model.safetensors")
    cases = {
        "missing": (
            {k: v for k, v in tensors.items() if k != "model.decoder.layers.1.fc2.weight"},
            "model.decoder.layers.1.fc2.weight",
        ),
        "extra": ({**tensors, "score.weight": np.zeros((1, 32), np.float32)}, "score.weight"),
        "shape": (
            {**tensors, "model.decoder.layers.0.fc1.bias": np.zeros(65, np.float32)},
            r"model.decoder.layers.0.fc1.bias has shape \(65,\)",
        ),
    }
    for name, (t, msg) in cases.items():
        d = tmp_path / name
        shutil.copytree(tmp_path / "good", d)
        save_file(t, d / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=msg):
            hf.load(d)
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load(tmp_path / "nowhere")


def test_save_refuses_what_the_family_cannot_express(tmp_path):
    gqa = M.ModelConfig.gpt2(vocab_size=V, d_model=32, n_heads=4, n_kv_heads=2)
    with pytest.raises(hf.UnsupportedConfig, match="kv_heads=2"):
        hf.save(gqa, random_params(gqa), tmp_path)
    rm = M.ModelConfig.llama(vocab_size=V, d_model=32, n_heads=4, head="scalar")
    with pytest.raises(hf.UnsupportedConfig, match="head='scalar'"):
        hf.save(rm, random_params(rm), tmp_path)
    biased = M.ModelConfig.llama(vocab_size=V, d_model=32, n_heads=4, mlp_bias=True)
    with pytest.raises(hf.UnsupportedConfig, match="mlp_bias=True"):
        hf.save(biased, random_params(biased), tmp_path)


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def make_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["the cat sat on the mat", "hello world"] * 10,
        trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<s>", "</s>"]),
    )
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)


def test_tokenizer_travels_with_the_checkpoint(tmp_path):
    make_tokenizer(tmp_path / "tok")
    src = hf.load_tokenizer(tmp_path / "tok")
    cfg = M.ModelConfig.gpt2(vocab_size=V, d_model=32, n_heads=4, max_len=16)
    hf.save(cfg, random_params(cfg), tmp_path / "out", tokenizer=src)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(tmp_path / "out"))
    with open(tmp_path / "out" / "config.json") as f:
        written = json.load(f)
    assert (written["bos_token_id"], written["eos_token_id"]) == (src.bos_id, src.eos_id) == (1, 2)
    vocab = hf.load_tokenizer(tmp_path / "out")
    text = "the cat sat on the mat"
    assert vocab.encode(text) == src.encode(text) and len(vocab.encode(text)) > 1
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    assert theirs(text, add_special_tokens=False)["input_ids"] == vocab.encode(text)


# ----------------------------------------------------------------------------------------------------
# scripts/convert_hf.py


def _convert_main():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "convert_hf.py")
    spec = importlib.util.spec_from_file_location("convert_hf", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_convert_script_round_trip_with_a_lora_run(tmp_path):
    from helpers import save_workdir

    from gptjax import checkpoint

    main = _convert_main()
    m = hf_model("llama", tied=False)
    m.save_pretrained(tmp_path / "hf")
    make_tokenizer(tmp_path / "hf")
    main(["--from-hf", str(tmp_path / "hf"), "--to", str(tmp_path / "base")])
    cfg, params = checkpoint.load_model(str(tmp_path / "base"))
    assert os.path.isfile(tmp_path / "base" / "tokenizer" / "tokenizer.json")
    np.testing.assert_array_less(np.abs(our_logits(cfg, params) - torch_logits(m)).max(), 1e-4)

    # A LoRA run on top of it stores only adapters and names its base in train.init_from.
    lcfg = cfg.replace(lora_rank=2, lora_targets=("wq", "wv", "w_out"))
    adapters = lora.split(random_params(lcfg, seed=3))[0]
    run_config = json.dumps({"train": {"init_from": str(tmp_path / "base")}})
    save_workdir(tmp_path / "sft", "sft", adapters, lcfg, step=7, config=run_config)
    main(["--to-hf", str(tmp_path / "out"), "--from", str(tmp_path / "sft")])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    want = our_logits(lcfg, lora.combine(adapters, params))
    assert np.abs(want - torch_logits(m)).max() > 1e-2  # the adapters changed the model
    np.testing.assert_array_less(np.abs(torch_logits(back) - want).max(), 1e-4)
    assert hf.load_tokenizer(tmp_path / "out").encode("the cat") == hf.load_tokenizer(tmp_path / "hf").encode(
        "the cat"
    )
