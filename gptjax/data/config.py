"""The ``config.data`` section: every option for users' own data, and the built-in tasks' sections.

    data = default_config()
    data.sources.web = source(format="text", path="/data/web/*.jsonl", clean=dict(dedup=True, near_dup=True))
    data.sources.books = source(format="text", tfds="my_books", data_dir="/data/tfds", rate=0.3)
    data.mixture = "web:0.7,books:0.3"          # one line blends sources (overrides their `rate`)

Every section is locked, so a misspelt key fails with its name; ``data.sources`` stays open so config files
can add sources (each built with ``source(...)``, which rejects unknown keys).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from gptjax.data import formats

# The batch formats (gptjax.data.formats), also called stages here: a source's ``stages`` names them.
STAGES = formats.NAMES
# The record formats a source can hold: each batch format's own, in the same order.
FORMATS = tuple(formats.get(name).record for name in STAGES)
# Which record formats can feed each stage (DeepSpeed-Chat style reuse of one dataset across stages):
# rankings give SFT their best response and RL their prompts; demonstrations give RL their prompts.
STAGE_FORMATS = {name: formats.get(name).records for name in STAGES}
# data.overflow: 'auto' (each format's default) or a policy some format applies
OVERFLOW = ("auto", *dict.fromkeys(p for name in STAGES for p in formats.get(name).overflows))


def _locked(**kw) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(kw)
    c.lock()
    return c


def fields_config(**overrides: str) -> ml_collections.ConfigDict:
    """Field names in the input records, so a dataset with other column names needs no conversion."""
    f = _locked(
        text="text",
        prompt="prompt",
        response="response",
        messages="messages",
        responses="responses",
        chosen="chosen",
        rejected="rejected",
        scores="scores",
    )
    f.update(overrides)
    return f


def clean_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Per-source cleaning switches (all off by default); each reports how many records it changed/removed."""
    c = _locked(
        unicode="",  # '' | 'NFC' | 'NFKC' | 'NFD' | 'NFKD': Unicode normalisation form
        control_chars=False,  # remove control characters except tab and newline
        whitespace=False,  # collapse runs of spaces/tabs, trim line ends, at most one blank line
        min_chars=0,  # drop records whose text (prompt + responses) is shorter; 0 = off
        max_chars=0,  # drop records whose text is longer; 0 = off
        dedup=False,  # drop exact duplicates (also across the sources of a mixture that switch it on)
        near_dup=False,  # drop near-duplicates by MinHash over character shingles (data.near_dup sets how)
    )
    c.update(overrides)
    return c


def source(**kw: Any) -> ml_collections.ConfigDict:
    """One data source. Give ``path`` (JSONL, or text files for format 'text'), ``tfds``, or ``builtin``."""
    s = ml_collections.ConfigDict(
        {
            # 'text' (pretraining) | 'sft' (demonstrations) | 'rank' (comparisons) | 'prompt' (for RL)
            "format": "text",
            "path": "",  # a file or glob: *.jsonl / *.json lines, or *.txt (format 'text' only)
            # held-out file(s); else data.validation_fraction is carved out by a stable hash
            "validation_path": "",
            # text files: '\n\n' = blank-line separated documents, '\n' = one per line, '' = one per file
            "doc_separator": "\n\n",
            "tfds": "",  # a TFDS dataset name (with optional ':version'), read with download=False
            "data_dir": "",  # where that TFDS dataset is prepared ('' = TFDS default)
            "split": "train",  # TFDS split for training
            "validation_split": "",  # TFDS split for validation ('' = carve data.validation_fraction)
            # a built-in task (BUILTINS): 'tiny' (settings in data.tiny) | 'arith' (settings in data.arith)
            "builtin": "",
            "fields": fields_config(),
            "rate": 1.0,  # mixing rate (relative; data.mixture overrides)
            "stages": "",  # comma list of stages this source feeds; '' = every stage its format can feed
            # e.g. 'sft:0.2,rm:0.4,prompts:0.4': disjoint shares by a stable hash of the prompt
            "stage_split": "",
            "clean": clean_config(),
        }
    )
    s.lock()
    for key, value in kw.items():
        if key not in s:
            raise KeyError(f"data source: unknown key {key!r}; known keys: {sorted(s.keys())}")
        if key in ("fields", "clean") and isinstance(value, dict):
            s[key].update(value)
        else:
            s[key] = value
    return s


def tiny_section(**overrides: Any) -> ml_collections.ConfigDict:
    """Settings of the built-in tiny task (see gptjax.data.tiny)."""
    t = _locked(
        seed=0,
        num_docs=3000,
        num_sft=3000,
        num_rank=2000,
        num_prompts=2000,
        num_eval=200,
        num_responses=4,
        label_temperature=0.15,
        text_noise=0.1,
        sft_noise=0.3,
        rank_noise=0.75,
    )
    t.update(overrides)
    return t


def arith_section(**overrides: Any) -> ml_collections.ConfigDict:
    """Settings of the built-in arithmetic task (see gptjax.data.arith)."""
    t = _locked(
        seed=0,
        num_docs=20000,  # pretraining documents of one worked problem each
        num_sft=256,  # demonstrations: few, so SFT leaves RL headroom
        num_prompts=2000,  # RL prompts (each record carries its answer)
        num_eval=200,  # held-out problems in the validation split
        min_terms=3,  # numbers per problem
        max_terms=4,
        max_value=9,  # every number and every partial result in [0, max_value]
        text_noise=0.1,  # share of wrong worked problems in the pretraining text
        sft_noise=0.25,  # share of flawed demonstrations (a slipped step, a miscopied answer, no final
        # answer form, or the answer without the work), a quarter each
    )
    t.update(overrides)
    return t


# The built-in tasks: data.sources.<name>.builtin names one; its settings are the section data.<name>.
BUILTINS = ("tiny", "arith")


def default_config() -> ml_collections.ConfigDict:
    """The data section with every option at its default and no sources (add them with ``source``)."""
    c = ml_collections.ConfigDict(
        {
            "sources": ml_collections.ConfigDict(),
            # 'name:rate,name:rate': the sources to blend and their rates ('' = all, at their own rates)
            "mixture": "",
            # kind 'byte' | 'sentencepiece' (path: the .model file) | 'hf' (path: a dir or tokenizer.json)
            "vocab": _locked(kind="byte", path=""),
            # records longer than the context: 'truncate' | 'drop' | 'split' (pretrain only);
            # 'auto' = split pretraining documents across rows, truncate everything else
            "overflow": "auto",
            "pack": True,  # pretrain/sft: pack several documents per row (segment ids keep them apart)
            "pad_side": "right",  # prompts: 'right' | 'left' padding of prompt_BP
            "num_responses": 0,  # rm: K, the responses per prompt in a batch; 0 = the most any record has
            # an extra seqio shuffle buffer across epochs (each epoch is already a full permutation)
            "shuffle_buffer": 0,
            "validation_fraction": 0.0,  # held-out share carved from sources without explicit validation data
            # exact / near dedup compare the records of all sources that switch it on
            "dedup_across_sources": True,
            "near_dup": _locked(threshold=0.8, ngram=5, num_perm=64, bands=16),  # MinHash LSH settings
            "tiny": tiny_section(),
            "arith": arith_section(),
        }
    )
    c.lock()
    c.sources.unlock()
    return c


def tiny_config(stage: str) -> ml_collections.ConfigDict:
    """``config.data`` for the built-in tiny task at ``stage`` ('pretrain' | 'sft' | 'rm' | 'prompts')."""
    if stage not in STAGES:
        raise ValueError(f"tiny_config: stage={stage!r}; use one of {STAGES}")
    c = default_config()
    c.sources.tiny = source(format=formats.get(stage).record, builtin="tiny")
    return c


def arith_config(stage: str) -> ml_collections.ConfigDict:
    """``config.data`` for the built-in arithmetic task at ``stage`` ('pretrain' | 'sft' | 'prompts'; it has
    no rankings)."""
    if stage not in STAGES or stage == "rm":
        raise ValueError(f"arith_config: stage={stage!r}; use one of {tuple(s for s in STAGES if s != 'rm')}")
    c = default_config()
    c.sources.arith = source(format=formats.get(stage).record, builtin="arith")
    return c
