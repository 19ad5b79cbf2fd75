"""Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): GRPO (``grpo.py``) without its two
normalisations, each of which biases the gradient.

    A_i  = r_i - mean(r_group)                                   no std: std_normalize False
    x_t  = w_t max(-A_i r_t, -A_i clip(r_t, 1 - clip, 1 + clip))
    loss = (1 / M) sum_i (1 / L_norm) sum_t x_it                 seq_mean_token_sum_norm

GRPO's 1 / |y_i| gives a short correct answer a larger step than a long one and a long wrong answer a smaller
penalty than a short one (the responses grow longer, mostly the wrong ones); dividing every response's token
sum by one constant L_norm (``length_norm``; 0: the rows' length L, a constant of the run; the paper: the
generation budget, configs/tiny.py sets rollout.max_new_tokens) keeps every token's weight equal. Dividing by
the group's std weighs prompts by how unanimous their answers are (too easy or too hard ones most). M counts
the responses of the FULL batch (``denominators``), so micro-batches add up exactly. No KL term (kl_coef 0;
with kl_coef > 0 the term is ``kl_estimator``'s, 'k2' by default, ``kl.py``). w_t is the rollout's truncated
importance weight where the batch has one (``ppo.py``).

Options (``OBJECTIVE``): clip, kl_coef, kl_estimator, std_eps (unused while std_normalize is False),
std_normalize, aggregation, length_norm (``grpo.py``).
"""

from __future__ import annotations

from gptjax.losses import grpo

OBJECTIVE = grpo.objective_with(
    {
        "clip": 0.2,
        "kl_coef": 0.0,
        "kl_estimator": "k2",
        "std_eps": 1e-4,
        "std_normalize": False,
        "aggregation": "seq_mean_token_sum_norm",
        "length_norm": 0.0,
    },
)
loss_fn = OBJECTIVE.loss_fn
