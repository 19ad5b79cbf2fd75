"""DAPO (Yu et al. 2025, Decoupled Clip and Dynamic sAmpling Policy Optimization): GRPO's loss
(``grpo.py``) with the paper's choices as defaults.

    x_t  = w_t max(-A r_t, -A clip(r_t, 1 - clip_low, 1 + clip_high))      clip-higher: 0.2 / 0.28
    loss = sum over the batch's response tokens of x_t / N                 token-level (token_mean)

A is GRPO's group-standardised score; N counts the response tokens of the FULL batch (``denominators``), so
every token weighs the same whatever its response's length and micro-batches add up exactly. A larger
clip_high lets an unlikely token's probability rise further before its ratio is clipped (against entropy
collapse); clip_low stays PPO's. No KL term (kl_coef 0; with kl_coef > 0 the term is ``kl_estimator``'s,
'k2' by default: the exact gradient of KL(pi || ref), ``kl.py``). w_t is the rollout's truncated importance
weight where the batch has one (``ppo.py``).

The paper's dynamic sampling (groups whose rewards are all equal dropped and refilled) and overlong reward
shaping are the rollout's (``gptjax.rl``), not the loss's.

Options (``OBJECTIVE``): clip_low, clip_high, kl_coef, kl_estimator, std_eps, std_normalize, aggregation,
length_norm (``grpo.py``).
"""

from __future__ import annotations

from gptjax.losses import grpo

OBJECTIVE = grpo.objective_with(
    {
        "clip_low": 0.2,
        "clip_high": 0.28,
        "kl_coef": 0.0,
        "kl_estimator": "k2",
        "std_eps": 1e-4,
        "std_normalize": True,
        "aggregation": "token_mean",
        "length_norm": 0.0,
    },
)
loss_fn = OBJECTIVE.loss_fn
