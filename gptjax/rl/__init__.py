"""The RL room: ``estimators.py`` (per-token KL estimators, GAE, whitening, the adaptive KL controller and one
rollout's experience: pure functions), ``rollout.py`` (the RL batch source: generate -> score -> experience ->
minibatches), ``reward.py`` (reward-model scoring and normalisation) and ``bon.py`` (best-of-n / rejection
sampling). ``gptjax.rl.gae`` and ``gptjax.rl.kl_penalty`` are the public names of the estimators.
"""

from gptjax.rl.estimators import (  # noqa: F401
    KL_KINDS,
    adaptive_kl_coef,
    experience,
    gae,
    kl_penalty,
    last_token_scores,
    masked_mean_var,
    score,
    score_chunk_rows,
    shift_right,
    whiten,
)
