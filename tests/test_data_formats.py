"""Batch formats as units: each unit's declared shapes are those of the batches the pipeline makes with it,
the tables derived from the units say what they said before, and an unknown format fails naming itself."""

import numpy as np
import pytest

from gptjax import data
from gptjax.data import config as config_lib
from gptjax.data import formats


def _tiny(stage, **data_kw):
    cfg = data.tiny_config(stage)
    cfg.tiny.update(dict(num_docs=120, num_sft=120, num_rank=80, num_prompts=80, num_eval=20))
    cfg.update(data_kw)
    return cfg


def _batch_shapes(batch):
    return {k: (v.shape, v.dtype) for k, v in batch.items()}


def _unit_shapes(fmt, B, L, cfg):
    return {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in fmt.shapes(B, L, cfg).items()}


@pytest.mark.parametrize(
    "name, data_kw, seq_len",
    [
        ("pretrain", {}, 48),
        ("sft", {"pack": False}, 48),
        ("rm", {"num_responses": 3}, 40),  # K below the records' 4: the rest are cut, the shape is K
        ("prompts", {"pad_side": "left"}, 16),  # seq_len is the prompt length P
    ],
)
def test_unit_shapes_are_the_pipelines_batch_shapes(name, data_kw, seq_len):
    cfg = _tiny(name, **data_kw)
    fmt = formats.get(name)
    it = data.make_iterator(
        cfg, stage=name, batch_size=3, seq_len=seq_len, seed=0, shard_index=0, num_shards=1
    )
    assert it.format is fmt
    expected = _unit_shapes(fmt, 3, seq_len, cfg)
    for _ in range(2):
        assert _batch_shapes(next(it)) == expected


def test_rm_shapes_need_k_named():
    with pytest.raises(ValueError, match="num_responses must name K"):
        formats.get("rm").shapes(2, 32, _tiny("rm"))


def test_unknown_format_names_itself_and_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown data format 'ppo'.*'pretrain', 'sft', 'rm', 'prompts'"):
        formats.get("ppo")
    with pytest.raises(ValueError, match="stage='ppo'"):
        data.make_iterator(
            _tiny("sft"), stage="ppo", batch_size=2, seq_len=32, seed=0, shard_index=0, num_shards=1
        )


def test_tables_derived_from_the_units():
    assert config_lib.STAGES == ("pretrain", "sft", "rm", "prompts")
    assert config_lib.FORMATS == ("text", "sft", "rank", "prompt")
    assert config_lib.STAGE_FORMATS == {
        "pretrain": ("text",),
        "sft": ("sft", "rank"),
        "rm": ("rank",),
        "prompts": ("prompt", "sft", "rank"),
    }
    assert config_lib.OVERFLOW == ("auto", "truncate", "drop", "split")
    for name in formats.NAMES:
        fmt = formats.get(name)
        assert fmt.name == name and formats.of_record(fmt.record) is fmt
    assert formats.of_record("pairs") is None
    # a ranking feeds SFT its best response and RL its prompt
    ranking = {"prompt": "p", "responses": ["best", "worse"]}
    assert formats.get("sft").convert(ranking, "rank") == {"prompt": "p", "response": "best"}
    assert formats.get("prompts").convert(ranking, "rank") == {"prompt": "p"}
    assert formats.get("pretrain").overflow_policy("auto") == "split"
    with pytest.raises(ValueError, match="'split' is for pretraining only, not stage 'rm'"):
        formats.get("rm").overflow_policy("split")


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_planner_takes_a_data_stage_batch_from_its_format(stage):
    from gptjax.model import sharding
    from gptjax.research import plan as plan_lib
    from gptjax.train import defaults

    c = defaults.load_config(f"configs/tiny.py:stage={stage}")
    c.unlock()
    c.data.num_responses = 2
    batch = plan_lib.abstract_batch(c, stage, sharding.make_mesh(c.mesh))
    B, L = c.train.batch_size, c.train.seq_len
    fmt = formats.get("sft" if stage == "sft" else "rm")
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()} == _unit_shapes(fmt, B, L, c.data)
