"""Hugging Face checkpoints (config.json + safetensors) to and from our (ModelConfig, params).

    cfg, params = load(path, mesh=None, dtype=None)     # GPT-2, OPT, LLaMA, Mistral, Qwen2 / 3, Gemma 2 / 3
    save(cfg, params, path, tokenizer=None)             # loadable by transformers' from_pretrained
    vocab = load_tokenizer(path)                        # gptjax.data.vocab.HuggingFaceVocabulary

An export with a tokenizer (an HF one's files, or the byte vocabulary's written as an HF tokenizer:
``hf_tokenizer``) is complete: tokenizer files and chat template, bos / eos / pad ids in config.json and a
generation_config.json, so transformers' AutoTokenizer, AutoModelForCausalLM and generate take it as it is.

Each family module (``hf_gpt2``, ``hf_opt``, ``hf_llama``, ``hf_qwen3``, ``hf_gemma``) gives the config
translation and one table of ``Entry`` rows: an HF tensor name (``{i}`` = layer index), the params it holds
and the two conversions. Loading reads one tensor at a time and sends each device only its shard, so a
checkpoint larger than one device still loads. Configs we cannot represent exactly are refused, naming the
field.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from gptjax import model
from gptjax.data.vocab import HuggingFaceVocabulary
from gptjax.interop import hf_tokenizer, lora
from gptjax.interop.hf_mapping import Entry, UnsupportedConfig  # noqa: F401 (hf.UnsupportedConfig)
from gptjax.interop.hf_tokenizer import TOKENIZER_FILES, copy_tokenizer  # noqa: F401 (hf.copy_tokenizer)

Params = dict[str, Any]
Path = tuple[str, ...]

# Fields of ModelConfig that describe the function a checkpoint computes (compared on save).
ARCH_FIELDS = model.ARCH_FIELDS


# ----------------------------------------------------------------------------------------------------
# Families


def _family_module(name: str):
    return importlib.import_module(f"gptjax.interop.hf_{name}")


# HF model_type -> family module (hf_<name>.py)
MODEL_TYPES = {
    "gpt2": "gpt2",
    "opt": "opt",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "qwen3",
    "gemma2": "gemma",
    "gemma3_text": "gemma",
}
# ModelConfig.family -> family module
FAMILY_MODULES = {
    "gpt2": "gpt2",
    "opt": "opt",
    "llama": "llama",
    "qwen3": "qwen3",
    "gemma2": "gemma",
    "gemma3": "gemma",
}


def family_of(hf_cfg: dict, where: str) -> Any:
    model_type = hf_cfg.get("model_type")
    if model_type == "gemma3":
        raise UnsupportedConfig(
            f"{where}: model_type='gemma3' is Gemma 3's multimodal model; load a text model "
            "(Gemma3ForCausalLM, model_type 'gemma3_text')"
        )
    if model_type not in MODEL_TYPES:
        raise UnsupportedConfig(
            f"{where}: model_type={model_type!r} is not supported; supported: {sorted(MODEL_TYPES)}"
        )
    return _family_module(MODEL_TYPES[model_type])


def config_from_hf(hf_cfg: dict, where: str = "config.json") -> model.ModelConfig:
    """ModelConfig for an HF config dict (refusing what we cannot represent exactly)."""
    return family_of(hf_cfg, where).config_from_hf(hf_cfg, where)


def config_to_hf(cfg: model.ModelConfig) -> dict:
    """HF config dict for a ModelConfig; refuses configs the family's HF architecture cannot express."""
    if cfg.head != "lm":
        raise UnsupportedConfig(f"head={cfg.head!r}: only LM-head models export to Hugging Face causal LMs")
    if cfg.family not in FAMILY_MODULES:
        raise UnsupportedConfig(f"family={cfg.family!r}: use one of {sorted(FAMILY_MODULES)}")
    hf_cfg = _family_module(FAMILY_MODULES[cfg.family]).config_to_hf(cfg)
    back = config_from_hf(hf_cfg, f"config written for family={cfg.family!r}")
    diff = [f for f in ARCH_FIELDS if getattr(back, f) != getattr(cfg, f)]
    if diff:
        raise UnsupportedConfig(
            f"family={cfg.family!r} in Hugging Face format cannot express "
            + ", ".join(f"{f}={getattr(cfg, f)!r}" for f in diff)
            + " (it would become "
            + ", ".join(f"{f}={getattr(back, f)!r}" for f in diff)
            + ")"
        )
    return hf_cfg


# ----------------------------------------------------------------------------------------------------
# Reading


def read_config(path: str) -> dict:
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json; pass a Hugging Face checkpoint directory")
    with open(cfg_file) as f:
        return json.load(f)


class TensorReader:
    """Tensors of a checkpoint directory by name, one at a time (model.safetensors or a sharded index)."""

    def __init__(self, path: str):

        index_file = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index_file):
            with open(index_file) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_file}: no 'weight_map' object")
        elif os.path.isfile(single):
            weight_map = None
        else:
            found = sorted(os.listdir(path))
            raise FileNotFoundError(
                f"{path}: no model.safetensors or model.safetensors.index.json (found {found}); "
                "convert .bin checkpoints to safetensors first"
            )
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._handles = {}
        for name in files:
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"{index_file}: lists {name}, which is missing")
            self._handles[name] = safe_open(full, framework="numpy")
        if weight_map is None:
            keys = self._handles["model.safetensors"].keys()
            weight_map = dict.fromkeys(keys, "model.safetensors")
        self.weight_map = weight_map
        self.path = path

    def names(self) -> set[str]:
        return set(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.weight_map[name]].get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        return self._handles[self.weight_map[name]].get_tensor(name)


def _resolve_names(entries: list[Entry], reader: TensorReader, prefix: str, n_layers: int) -> dict[str, str]:
    """Canonical HF name -> name in this checkpoint (base-model checkpoints lack the ``prefix``)."""
    have = reader.names()
    out, missing = {}, []
    for e in entries:
        for i in range(n_layers) if e.per_layer else [None]:
            name = e.hf.format(i=i)
            for cand in (name, name.removeprefix(prefix)):
                if cand in have:
                    out[name] = cand
                    break
            else:
                missing.append(name)
    if missing:
        raise ValueError(
            f"{reader.path}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
            f"({len(missing)} in all)"
        )
    return out


def _check_shapes(entries: list[Entry], cfg: model.ModelConfig, reader: TensorReader, names: dict[str, str]):
    """Compare every HF tensor's shape with what our config implies, before reading any data."""
    shapes = _flat(model.param_shapes(cfg))
    for e in entries:
        layer = [np.broadcast_to(np.zeros((), np.float32), _layer_shape(shapes[p], p)) for p in e.ours]
        want = tuple(e.to_hf(*layer).shape)
        for i in range(cfg.n_layers) if e.per_layer else [None]:
            name = e.hf.format(i=i)
            got = reader.shape(names[name])
            if got != want:
                raise ValueError(
                    f"{reader.path}: tensor {names[name]} has shape {got}; config.json implies {want}"
                )


def _layer_shape(s: Any, path: Path) -> tuple[int, ...]:
    return tuple(s.shape[1:]) if path[0] == "blocks" else tuple(s.shape)


def _flat(tree: Params) -> dict[Path, Any]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[tuple(str(getattr(k, "key", k)) for k in path)] = leaf
    return out


def _unflatten(flat: dict[Path, Any]) -> Params:
    out: Params = {}
    for path, leaf in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def _checkpoint_dtype(hf_cfg: dict) -> str:
    dt = hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32"
    # float16 loads as float32 (exact); bfloat16 stays bfloat16.
    return "bfloat16" if dt == "bfloat16" else "float32"


def _place(one: Callable, s: Any, sharding: jax.sharding.Sharding, n_layers: int | None) -> jax.Array:
    """One param built shard by shard: ``one(i)`` is layer i's full slice (``one(None)`` if not stacked).

    Each HF tensor is read once; every distinct shard this process needs is cut from it and only those
    shards go to their devices, so host memory peaks at one param and device memory at one shard.
    """
    dtype = jnp.dtype(s.dtype)
    index_of = sharding.addressable_devices_indices_map(tuple(s.shape))

    def key(index):
        return tuple((x.start, x.stop, x.step) for x in index)

    unique = {key(ix): ix for ix in index_of.values()}
    shards: dict[tuple, np.ndarray] = {}
    if n_layers is None:
        full = one(None)
        shards = {k: np.asarray(full[ix], dtype) for k, ix in unique.items()}
    else:
        layers = {k: range(n_layers)[ix[0]] for k, ix in unique.items()}
        for i in range(n_layers):
            full = None
            for k, ix in unique.items():
                if i not in layers[k]:
                    continue
                full = one(i) if full is None else full
                part = np.asarray(full[ix[1:]], dtype)
                if k not in shards:
                    shards[k] = np.empty((len(layers[k]), *part.shape), dtype)
                shards[k][layers[k].index(i)] = part
    arrays = [jax.device_put(shards[key(ix)], d) for d, ix in index_of.items()]
    return jax.make_array_from_single_device_arrays(tuple(s.shape), sharding, arrays)


def load(
    path: str, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None
) -> tuple[model.ModelConfig, Params]:
    """(ModelConfig, params) from a local HF checkpoint directory.

    With a ``mesh`` every param is created directly in its ``model.param_shardings`` layout, each device
    shard cut from one layer's HF tensor at a time (see ``_place``). ``dtype`` (param dtype) defaults to the
    checkpoint's (float16 becomes float32); compute dtype is bfloat16 for bfloat16 params, else float32.
    """
    path = os.fspath(path)
    hf_cfg = read_config(path)
    where = os.path.join(path, "config.json")
    fam = family_of(hf_cfg, where)
    cfg = fam.config_from_hf(hf_cfg, where)
    pd = dtype or _checkpoint_dtype(hf_cfg)
    cfg = cfg.replace(param_dtype=pd, dtype="bfloat16" if pd == "bfloat16" else "float32")
    reader = TensorReader(path)
    entries = fam.entries(cfg)
    names = _resolve_names(entries, reader, fam.PREFIX, cfg.n_layers)
    unused = sorted(reader.names() - set(names.values()) - set(fam.ignorable(reader.names(), cfg)))
    if unused:
        raise ValueError(
            f"{reader.path}: tensors {unused[:8]} ({len(unused)} in all) have no place in a "
            f"{hf_cfg.get('model_type')} causal LM; is this another architecture or head?"
        )
    _check_shapes(entries, cfg, reader, names)

    shapes = _flat(model.param_shapes(cfg))
    if mesh is None:
        shardings = {p: jax.sharding.SingleDeviceSharding(jax.devices()[0]) for p in shapes}
    else:
        shardings = _flat(model.param_shardings(cfg, mesh))
    where_of = {p: (e, j) for e in entries for j, p in enumerate(e.ours)}
    if set(where_of) != set(shapes):
        raise AssertionError(f"hf table for {cfg.family} misses {sorted(set(shapes) - set(where_of))}")

    out = {}
    for p, s in shapes.items():
        entry, j = where_of[p]

        def one(i, entry=entry, j=j):
            return entry.to_ours(reader.get(names[entry.hf.format(i=i)]))[j]

        out[p] = _place(one, s, shardings[p], cfg.n_layers if p[0] == "blocks" else None)
    return cfg, _unflatten(out)


# ----------------------------------------------------------------------------------------------------
# Writing


def _host(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def save(
    cfg: model.ModelConfig, params: Params, path: str, tokenizer: Any = None, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Write ``path``/config.json + model.safetensors (sharded with an index above ``max_shard_bytes``).

    LoRA adapters are merged first. ``tokenizer``: a checkpoint directory or tokenizer.json path (or an object
    with such a ``path``) whose tokenizer files are copied alongside, or the byte vocabulary (a
    ``ByteVocabulary`` or ``"byte"``), written as a byte-level HF tokenizer; its bos / eos / pad ids go to
    config.json and generation_config.json (``hf_tokenizer.write``). Only process 0 writes.
    """
    path = os.fspath(path)
    if cfg.lora_rank:
        cfg, params = lora.merge(cfg, params)
    hf_cfg = config_to_hf(cfg)
    lora._check_structure(cfg, params, "hf.save")
    fam = _family_module(FAMILY_MODULES[cfg.family])
    flat = _flat(params)
    np_dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    hf_cfg["torch_dtype"] = str(np.dtype(np_dtype).name) if cfg.param_dtype != "bfloat16" else "bfloat16"

    # (name, layer, entry) in order; sizes estimated from our params to plan the shard files.
    items = []
    for e in fam.entries(cfg):
        for i in range(cfg.n_layers) if e.per_layer else [None]:
            size = sum(flat[p].size // (cfg.n_layers if p[0] == "blocks" else 1) for p in e.ours)
            items.append((e.hf.format(i=i), i, e, size * np_dtype.itemsize))
    files: list[list] = [[]]
    used = 0
    for item in items:
        if files[-1] and used + item[3] > max_shard_bytes:
            files.append([])
            used = 0
        files[-1].append(item)
        used += item[3]

    write = jax.process_index() == 0
    if write:
        os.makedirs(path, exist_ok=True)
    weight_map, total = {}, 0
    for k, group in enumerate(files):
        fname = (
            "model.safetensors" if len(files) == 1 else f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        )
        tensors = {}
        for name, i, e, _ in group:
            parts = [_host(flat[p][i] if p[0] == "blocks" else flat[p]) for p in e.ours]
            tensors[name] = np.ascontiguousarray(e.to_hf(*parts)).astype(np_dtype)
            total += tensors[name].nbytes
            weight_map[name] = fname
        if write:
            save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
    if not write:
        return
    if len(files) > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    hf_cfg.update(hf_tokenizer.write(tokenizer, path, cfg.vocab_size, cfg.max_len))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)


def load_tokenizer(path: str) -> Any:
    """The checkpoint's tokenizer as a ``HuggingFaceVocabulary`` (path: a directory or tokenizer.json)."""
    return HuggingFaceVocabulary(os.fspath(path))
