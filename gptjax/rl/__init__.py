"""The RL room: ``estimators.py`` (per-token KL estimators, GAE, whitening, the adaptive KL controller and one
rollout's experience: pure functions), ``rollout.py`` (the RL batch source: generate -> score -> experience ->
minibatches), ``reward.py`` (reward-model scoring and normalisation) and ``bon.py`` (best-of-n / rejection
sampling). ``gptjax.rl.gae`` and ``gptjax.rl.kl_penalty`` are the public names of the estimators.
"""

from gptjax.rl.estimators import (  # noqa: F401
    kl_penalty,
    gae,
    masked_mean_var,
    whiten,
    adaptive_kl_coef,
    shift_right,
    last_token_scores,
    score_chunk_rows,
    score,
    experience,
    KL_KINDS,
)
