"""Objectives, one module each, and the per-token pieces they share.

A loss module declares itself once, ``OBJECTIVE = Objective(...)`` (``objective.py``); ``objective(name)``
returns that declaration for ``config.loss.name``. Shared pieces: ``ctx`` (the losses' Ctx), ``logprobs``
(response log-probs), ``vocab`` (chunked LM-head terms), ``kl`` (per-token KL estimators), ``masked``
(masked statistics, the value alignment of rollout rows). Nothing here imports gptjax.rl or gptjax.train.
"""

from gptjax.losses.objective import DATA_FORMATS, KL_PLACES, Objective, ScoredRollout, objective  # noqa: F401
