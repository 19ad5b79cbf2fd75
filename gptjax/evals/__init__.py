"""Evaluators (docs/architecture.md): each a unit in its own module that declares what it measures, the
models it loads and its options (``unit.Evaluator``), found by name or as any 'module:function':

    gold          sampled and greedy gold reward on held-out prompts (+ KL to a reference, RM score)
    kl            KL(policy || reference) per answer
    rm_accuracy   a reward model's held-out pairwise accuracy and gold agreement
    text_loss     held-out text loss (what PPO-ptx protects)
    best_of_n     gold reward of the reward model's best of n samples

``config.evals`` schedules them in the loop (``runner``); the pipeline, the sweeps, the overoptimization study
and iterated RLHF call the same ones (``measure``). ``evaluate`` holds the sampling and scoring they share.
"""

from gptjax.evals.runner import Runner, configured, entry, merge_results, read_results  # noqa: F401
from gptjax.evals.unit import BUILT_INS, Evaluator, Inputs, evaluator, load_model, measure, numbers  # noqa: F401
