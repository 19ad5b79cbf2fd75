"""KL to a reference: KL(policy || ref) per answer, the mean over sampled answers to held-out prompts of
log pi(answer) - log ref(answer) at the sampling temperature, and its standard error over prompts. The
reference is the run's own ('@ref', default) or any workdir / HF directory ('runs/demo/sft'); the samples
are the gold evaluator's for the same options, so the two describe one set of answers.
"""

from __future__ import annotations

from typing import Any

import jax

from gptjax.evals import evaluate
from gptjax.evals.gold import prompts_of
from gptjax.evals.unit import Evaluator, Inputs


def kl_to_ref(inputs: Inputs, opts) -> dict[str, Any]:
    cfg, params = inputs.model("lm")
    out = evaluate.policy_result(
        cfg,
        params,
        inputs.vocab,
        prompts_of(opts),
        None,
        rng=jax.random.key(opts.seed),
        ref=inputs.load(opts.ref),
        samples_per_prompt=opts.samples,
        temperature=opts.temperature,
        max_new_tokens=opts.max_new_tokens,
        batch_size=opts.batch_size,
    )
    return {k: out[k] for k in ("kl_to_ref", "kl_to_ref_se", "eos_rate", "mean_length")}


EVALUATOR = Evaluator(
    fn=kl_to_ref,
    head="lm",
    models=("ref",),
    options={
        "ref": "@ref",  # '@ROLE' (the run's) or a workdir / HF directory, '#ROLE' / '#ema' after it
        "prompts": 200,
        "prompts_fn": "",  # 'module:function' f(n) -> prompts; '': the tiny task's held-out prompts
        "samples": 4,
        "temperature": 1.0,
        "max_new_tokens": 24,
        "batch_size": 128,
        "seed": 1,
    },
)
