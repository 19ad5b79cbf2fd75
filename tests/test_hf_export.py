"""Complete Hugging Face exports: a byte-vocabulary model's export carries a tokenizer whose ids are the byte
vocabulary's, eos / bos / pad ids and generation_config.json, so transformers loads and generates from it
without a warning, greedy tokens equal to ours; an imported model's export carries its tokenizer files and
chat template."""

import importlib.util
import json
import logging
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from helpers import save_workdir

from gptjax import model as M
from gptjax.data import vocab as vocab_lib
from gptjax.interop import hf, hf_tokenizer
from gptjax.model import sample

BYTES = vocab_lib.ByteVocabulary()
TEXTS = ["hello world", "héllo ünïcode ✓ 🙂", "tabs\tand\nnew lines\r\n", "</s> <s> <|eos|>? <pad>", " lead"]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]


def random_params(cfg, seed=0, std=1.0):
    """Params of the right shapes without model.init's compile; wide, so greedy steps are clear (top-2 logit
    gaps ~1, far above float noise) and the tokens vary."""
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape), s.dtype), M.param_shapes(cfg))


def _convert_main():
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "convert_hf.py")
    spec = importlib.util.spec_from_file_location("convert_hf", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_byte_tokenizer_ids_are_the_byte_vocabulary_ids(tmp_path):
    hf_tokenizer.write_byte_tokenizer(str(tmp_path), model_max_length=64)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids = (theirs.pad_token_id, theirs.bos_token_id, theirs.eos_token_id)
    assert ids == (BYTES.pad_id, BYTES.bos_id, BYTES.eos_id) and len(theirs) == BYTES.vocab_size
    ours = vocab_lib.HuggingFaceVocabulary(str(tmp_path))  # gptjax reading the export back
    assert (ours.pad_id, ours.bos_id, ours.eos_id, ours.vocab_size) == (*ids, BYTES.vocab_size)
    for text in TEXTS[:3]:
        want = BYTES.encode(text)
        assert theirs(text, add_special_tokens=False)["input_ids"] == want == ours.encode(text)
        assert theirs(text)["input_ids"] == [BYTES.bos_id, *want]  # BOS first, as our converters add it
        assert theirs.decode(want) == text == ours.decode(want + [BYTES.eos_id, 65])
    # special tokens' text is special in transformers (as in any HF tokenizer); plain text is not
    assert theirs("<s></s><pad>", add_special_tokens=False)["input_ids"] == BYTES.encode("<s></s><pad>")
    assert theirs.decode([*BYTES.encode("a"), BYTES.eos_id], skip_special_tokens=True) == "a"
    # the chat template is the plain format the model was trained on, BOS as an id
    chat_ids = theirs.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    assert chat_ids == [BYTES.bos_id, *BYTES.encode(vocab_lib.render_plain_chat(CHAT))]
    assert ours.render_chat(CHAT) == BYTES.render_chat(CHAT)
    assert {hf_tokenizer._byte_chars()[b] for b in range(256)} == set(
        __import__("tokenizers").pre_tokenizers.ByteLevel.alphabet()
    )


def test_byte_workdir_export_generates_in_transformers_like_gptjax_without_warnings(tmp_path):
    cfg = M.ModelConfig.gpt2(vocab_size=288, d_model=32, n_layers=2, n_heads=4, max_len=64)  # tiny's vocab
    params = random_params(cfg)
    run = json.dumps({"data": {"vocab": {"kind": "byte", "path": ""}}})
    workdir = save_workdir(tmp_path / "sft", "sft", params, cfg, config=run)
    _convert_main()(["--to-hf", str(tmp_path / "hf"), "--from", workdir])
    out = tmp_path / "hf"
    assert {
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    } <= set(os.listdir(out))
    with open(out / "config.json") as f:
        written = json.load(f)
    ids = {"bos_token_id": BYTES.bos_id, "eos_token_id": BYTES.eos_id, "pad_token_id": BYTES.pad_id}
    assert {k: written[k] for k in ids} == ids
    with open(out / "generation_config.json") as f:
        assert json.load(f) == ids

    caught = _Records()
    transformers.utils.logging.add_handler(caught)
    try:
        with warnings.catch_warnings(record=True) as python_warnings:
            warnings.simplefilter("always")
            m = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
            tok = transformers.AutoTokenizer.from_pretrained(str(out))
            prompts = ["the cat sat", "2+2="]
            theirs = []
            for p in prompts:
                with torch.no_grad():
                    enc = tok(p, return_tensors="pt")
                    g = m.generate(**enc, max_new_tokens=12, do_sample=False)
                theirs.append(g[0, enc["input_ids"].shape[1] :].tolist())
    finally:
        transformers.utils.logging.remove_handler(caught)
    assert caught.messages == []
    noisy = ("eos", "pad", "bos", "generation", "token")
    assert [str(w.message) for w in python_warnings if any(n in str(w.message).lower() for n in noisy)] == []

    # gptjax's greedy generation from the same weights and the same [BOS] + bytes prompts
    rows = [[BYTES.bos_id, *BYTES.encode(p)] for p in prompts]
    P = max(map(len, rows))
    prompts_BP = np.array([r + [BYTES.pad_id] * (P - len(r)) for r in rows], np.int32)
    ours = sample.generate(
        cfg,
        params,
        jnp.asarray(prompts_BP),
        jax.random.PRNGKey(0),
        max_new_tokens=12,
        prompt_lengths_B=jnp.asarray([len(r) for r in rows]),
        temperature=0.0,
        eos_id=BYTES.eos_id,
        pad_id=BYTES.pad_id,
    )
    for row, hf_row in zip(np.asarray(ours).tolist(), theirs, strict=True):
        end = row.index(BYTES.eos_id) + 1 if BYTES.eos_id in row else len(row)
        assert hf_row == row[:end]
    assert len({t for row in theirs for t in row}) > 3  # not one token repeated: a real comparison


def _hf_tokenizer_dir(path, *, generation_config=None):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<s>", "</s>", "hi", "there"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(path / "additional_chat_templates")
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    )
    (path / "additional_chat_templates" / "tool_use.jinja").write_text("{{ messages | tojson }}")
    if generation_config:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    return path


@pytest.mark.parametrize("own_generation_config", [False, True])
def test_imported_model_export_carries_its_tokenizer_and_chat_template(tmp_path, own_generation_config):
    gen = {"eos_token_id": [2, 4], "do_sample": True, "temperature": 0.6} if own_generation_config else None
    src = _hf_tokenizer_dir(tmp_path / "src", generation_config=gen)
    cfg = M.ModelConfig.llama(vocab_size=16, d_model=16, n_heads=2, n_layers=1, max_len=32)
    hf.save(cfg, random_params(cfg), tmp_path / "out", tokenizer=hf.load_tokenizer(src))
    out = tmp_path / "out"
    for name in ("tokenizer.json", "chat_template.jinja", "additional_chat_templates/tool_use.jinja"):
        assert (out / name).read_text() == (src / name).read_text()
    with open(out / "config.json") as f:
        written = json.load(f)
    assert {k: written[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,  # no pad token: EOS pads, as gptjax's vocabulary does
    }
    with open(out / "generation_config.json") as f:  # the source's own, else one from the ids
        assert json.load(f) == (gen or {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    msgs = [{"role": "user", "content": "hi"}]
    assert (
        theirs.apply_chat_template(msgs, tokenize=False)
        == "[user]hi"
        == hf.load_tokenizer(out).render_chat(msgs, add_generation_prompt=False)
    )
    assert set(theirs.chat_template) == {"default", "tool_use"}


def test_export_without_a_tokenizer_leaves_no_ids_outside_the_vocabulary(tmp_path):
    cfg = M.ModelConfig.gpt2(vocab_size=96, d_model=16, n_heads=2, n_layers=1, max_len=16)
    hf.save(cfg, random_params(cfg), tmp_path)
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["eos_token_id"] is None and written["bos_token_id"] is None  # not GPT-2's 50256
    assert not os.path.exists(tmp_path / "generation_config.json")
    with pytest.raises(ValueError, match="byte vocabulary has 259 ids but the model only 96"):
        hf.save(cfg, random_params(cfg), tmp_path / "b", tokenizer="byte")
