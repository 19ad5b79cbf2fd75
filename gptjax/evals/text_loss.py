"""Held-out text loss: a policy's next-token loss (nats per token) and accuracy on the first ``batches``
validation batches of pretraining text, the same batches at every evaluation. What PPO-ptx protects: RL moves
the policy away from the pretraining distribution (InstructGPT's "alignment tax").

The text is ``data`` (a data config section) when given, else the run's PPO-ptx data (``config.ptx.data``),
else the run's own data for a pretraining run, else the tiny task's text.
"""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict

from gptjax import data
from gptjax.evals import evaluate
from gptjax.evals.unit import Evaluator, Inputs


def data_section(inputs: Inputs, opts):
    if opts.data:
        return opts.data.as_configdict() if hasattr(opts.data, "as_configdict") else ConfigDict(opts.data)
    run = inputs.config
    if run is not None and "ptx" in run:
        return run.ptx.data
    if run is not None and run.get("stage") == "pretrain":
        return run.data

    return data.tiny_config("pretrain")


def text_loss(inputs: Inputs, opts) -> dict[str, Any]:
    cfg, params = inputs.model("lm")
    run = inputs.config
    seq_len = opts.seq_len or (run.train.seq_len if run is not None else 0) or cfg.max_len
    return evaluate.text_loss(
        cfg,
        params,
        data_section(inputs, opts),
        seq_len=seq_len,
        batch_size=opts.batch_size,
        batches=opts.batches,
    )


EVALUATOR = Evaluator(
    fn=text_loss,
    head="lm",
    options={
        "data": "",  # a data config section of text; '': the run's ptx text / its own / the tiny task's
        "seq_len": 0,  # 0: the run's train.seq_len
        "batch_size": 32,
        "batches": 4,
    },
)
