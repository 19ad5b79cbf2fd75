"""Experience for PPO: per-token KL penalty, GAE, whitening, the KL controller, and one rollout's experience.

Everything here is a pure function (jittable); ``gptjax.rl.rollout`` drives them from the train loop.

Critic-free objectives (GRPO, RLOO, GSPO, REINFORCE++) declare ``advantages(scored, opts) -> adv_BT``
(``gptjax.losses.Objective``): ``experience`` hands it the rollout's scores and per-token KL
(``gptjax.losses.ScoredRollout``) and uses its per-token advantages in place of GAE.

Layout: a rollout row is ``BOS prompt response [EOS] pad...`` of length L = P + T, right-padded, and every
per-token array is aligned with the tokens: ``x_BL[b, t]`` belongs to token t (its log-prob is predicted at
t - 1), and ``mask_BL`` is True on the response tokens (EOS included). The value of the state before token t
(``values_BL[b, t]``) is the value head's output at t - 1, the reward of the whole response sits on its last
token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gptjax import model
from gptjax.losses import logprobs
from gptjax.losses.kl import KL_KINDS, kl_penalty  # noqa: F401  (gptjax.rl's public names)
from gptjax.losses.masked import masked_mean_var, shift_right, whiten  # noqa: F401
from gptjax.losses.objective import ScoredRollout


def gae(
    rewards_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, gamma: float, lam: float
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation along T; returns (advantages_BT, returns_BT), 0 off the mask.

    The step after t is the next position with mask 1 (positions with mask 0 are skipped, not ends), and the
    episode ends after the row's last masked position (next value 0):
    delta_t = r_t + gamma * V_next - V_t,  A_t = delta_t + gamma * lam * A_next,  returns = A + V.
    """
    mask_BT = mask_BT.astype(bool)
    r_TB = jnp.where(mask_BT, rewards_BT.astype(jnp.float32), 0.0).T
    v_TB = jnp.where(mask_BT, values_BT.astype(jnp.float32), 0.0).T

    def step(carry, xs):
        next_v_B, next_a_B = carry
        r_B, v_B, m_B = xs
        a_B = r_B + gamma * next_v_B - v_B + gamma * lam * next_a_B
        carry = (jnp.where(m_B, v_B, next_v_B), jnp.where(m_B, a_B, next_a_B))
        return carry, jnp.where(m_B, a_B, 0.0)

    zeros_B = jnp.zeros(r_TB.shape[1], jnp.float32)
    _, adv_TB = jax.lax.scan(step, (zeros_B, zeros_B), (r_TB, v_TB, mask_BT.T), reverse=True)
    adv_BT = adv_TB.T
    return adv_BT, jnp.where(mask_BT, adv_BT + v_TB.T, 0.0)


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: float, n_steps: int) -> float:
    """Ziegler et al. (2019) proportional controller: the error kl/target - 1 is clipped to +-0.2 and the
    coefficient moves by ``error * n_steps / horizon`` of itself (n_steps: episodes since the last update)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)


def last_token_scores(values_BL: jax.Array, lengths_B: jax.Array) -> jax.Array:
    """The scalar head's output at each row's last real token (a reward model's score)."""
    idx_B = jnp.clip(lengths_B - 1, 0, values_BL.shape[1] - 1)
    return jnp.take_along_axis(values_BL, idx_B[:, None], axis=1)[:, 0]


def score_chunk_rows(batch: int, row_bytes: int, devices: int = 1, budget: int = 2**31) -> int:
    """Rows per forward pass when scoring a rollout: the most rows whose fp32 logits (``row_bytes`` a row)
    fit ``budget``, dividing ``batch`` and a multiple of ``devices`` (the batch's data-parallel split) where
    the batch allows; the whole batch when it fits."""
    fits = max(1, budget // max(row_bytes, 1))
    if batch <= fits:
        return batch
    splittable = [r for r in range(1, batch + 1) if batch % r == 0 and r % devices == 0]
    candidates = [r for r in splittable if r <= fits] or splittable[:1]
    return max(candidates) if candidates else batch


def score(
    params: dict[str, Any],
    cfgs: dict[str, model.ModelConfig],
    tokens_BL: jax.Array,
    prompt_lengths_B: jax.Array,
    lengths_B: jax.Array,
    temperature: jax.Array,
    chunk_rows: int = 0,
) -> dict[str, jax.Array]:
    """The roles' per-token outputs: policy and reference log-probs, values (when ``cfgs`` has a 'value'
    role), reward-model outputs (fp32, when it has a 'reward' role) and the response mask. ``chunk_rows``
    (0: all at once) runs the forward passes that many rows at a time, so only one chunk's logits are ever in
    memory; chunk k takes rows k, k + n, k + 2n, ... (n chunks), so every chunk keeps the batch's split over
    data-parallel devices."""

    def rows(tokens, prompt_lengths, lengths):
        logp, mask = logprobs.response_logprobs(
            cfgs["policy"], params["policy"], tokens, prompt_lengths, lengths, temperature=temperature
        )
        ref_logp, _ = logprobs.response_logprobs(
            cfgs["ref"], params["ref"], tokens, prompt_lengths, lengths, temperature=temperature
        )
        out = {"logp": logp, "mask": mask, "ref_logp": ref_logp}
        if "reward" in cfgs:  # no reward model when every reward term is a function (rollout.rm_weight=0)
            out["rm"] = model.apply(cfgs["reward"], params["reward"], tokens).astype(jnp.float32)
        if "value" in cfgs:
            out["values"] = model.apply(cfgs["value"], params["value"], tokens).astype(jnp.float32)
        return out

    B = tokens_BL.shape[0]
    if not chunk_rows or chunk_rows >= B:
        return rows(tokens_BL, prompt_lengths_B, lengths_B)
    if B % chunk_rows:
        raise ValueError(f"score: chunk_rows={chunk_rows} must divide the batch of {B} rows")
    n = B // chunk_rows
    split = lambda x: x.reshape(chunk_rows, n, *x.shape[1:]).swapaxes(0, 1)
    join = lambda y: y.swapaxes(0, 1).reshape(B, *y.shape[2:])
    out = jax.lax.map(lambda xs: rows(*xs), (split(tokens_BL), split(prompt_lengths_B), split(lengths_B)))
    return jax.tree.map(join, out)


def experience(
    params: dict[str, Any],
    cfgs: dict[str, model.ModelConfig],
    tokens_BL: jax.Array,
    prompt_lengths_B: jax.Array,
    lengths_B: jax.Array,
    ended_B: jax.Array,
    kl_coef: jax.Array,
    temperature: jax.Array,
    opts: Any,
    advantages_fn: Callable | None = None,
    loss_opts: Any = None,
    extra_score_B: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """One rollout batch's experience: old log-probs and values, reference log-probs, scores, rewards, GAE.

    ``params`` / ``cfgs`` hold the roles 'policy', 'value', 'ref' and 'reward'; ``lengths_B`` counts all real
    tokens (prompt + response); ``opts`` is the rollout section (kl_kind, gamma, lam, whiten_advantages,
    reward_at, reward_norm, reward_clip, missing_eos_penalty, samples_per_prompt, rm_weight; score_rows:
    ``score``'s chunk_rows). Old log-probs are recomputed with a full forward pass (the numbers the loss
    compares against), at the sampling temperature.

    The raw score is ``rm_weight`` x the reward model's score (when there is a 'reward' role) plus
    ``extra_score_B``, the rollout's function terms already weighted and summed on the host
    (``gptjax.rl.reward_terms``); the missing-EOS penalty, normalisation and clipping apply to the sum.

    With ``advantages_fn`` (a critic-free objective's ``advantages``, called with ``loss_opts``) there is no
    'value' role: the advantages are ``advantages_fn(ScoredRollout(score_B, kl_BL, mask_BL, kl_coef,
    samples_per_prompt), loss_opts)`` per token, kl_BL being the ``kl_kind`` estimate on the response tokens,
    and the experience carries ``ref_logp_BL`` instead of values and returns.
    """
    out = score(params, cfgs, tokens_BL, prompt_lengths_B, lengths_B, temperature, opts.get("score_rows", 0))
    logp_BL, mask_BL, ref_logp_BL = out["logp"], out["mask"], out["ref_logp"]
    stats = {}
    raw_score_B = jnp.zeros(tokens_BL.shape[:1], jnp.float32)
    if "rm" in out:
        rm_BL = out["rm"]
        if opts.reward_at == "mean":  # a reward model trained on its mean over the response (loss.reward_at)
            rm_B = jnp.sum(jnp.where(mask_BL, rm_BL, 0.0), 1) / jnp.maximum(jnp.sum(mask_BL, 1), 1)
        else:
            rm_B = last_token_scores(rm_BL, lengths_B)
        stats["rm_score_B"] = rm_B
        rm_weight = opts.get("rm_weight", 1.0)
        raw_score_B = rm_B if rm_weight == 1.0 else rm_weight * rm_B
    if extra_score_B is not None:
        raw_score_B = raw_score_B + extra_score_B.astype(jnp.float32)
    score_B = raw_score_B - jnp.where(ended_B, 0.0, opts.missing_eos_penalty)
    if opts.reward_norm:  # over the rollout batch
        mean, var = masked_mean_var(score_B, jnp.ones_like(score_B))
        score_B = (score_B - mean) * jax.lax.rsqrt(var + 1e-8)
    if opts.reward_clip > 0:
        score_B = jnp.clip(score_B, -opts.reward_clip, opts.reward_clip)

    kl_BL = jnp.where(mask_BL, kl_penalty(logp_BL, ref_logp_BL, opts.kl_kind), 0.0)
    k1_BL = jnp.where(mask_BL, logp_BL - ref_logp_BL, 0.0)
    exp = {
        "tokens_BL": tokens_BL,
        "prompt_lengths_B": prompt_lengths_B,
        "lengths_B": lengths_B,
        "old_logp_BL": logp_BL,
        "stats": {  # per row
            **stats,
            "score_B": raw_score_B,
            "shaped_score_B": score_B,
            "kl_B": jnp.sum(k1_BL, axis=1),  # the k1 KL: an unbiased estimate
            "kl_penalty_B": jnp.sum(kl_BL, axis=1),
        },
    }
    if advantages_fn is not None:
        scored = ScoredRollout(score_B, kl_BL, mask_BL, kl_coef, opts.samples_per_prompt)
        adv_BL = advantages_fn(scored, loss_opts)
        diagnostics = {}
        if opts.samples_per_prompt > 1:
            # a group of equal scores teaches nothing: how spread the scores within a group are
            group_std = jnp.std(score_B.reshape(-1, opts.samples_per_prompt), axis=1)
            diagnostics = {
                "group_score_std": jnp.mean(group_std),
                "tied_groups": jnp.mean((group_std < 1e-6).astype(jnp.float32)),
            }
        return {
            **exp,
            "advantages_BL": jnp.where(mask_BL, adv_BL.astype(jnp.float32), 0.0),
            "ref_logp_BL": ref_logp_BL,
            "diagnostics": diagnostics,
        }

    values_BL = jnp.where(mask_BL, shift_right(out["values"]), 0.0)
    last_BL = jnp.arange(tokens_BL.shape[1])[None, :] == (lengths_B - 1)[:, None]
    rewards_BL = -kl_coef * kl_BL + jnp.where(last_BL & mask_BL, score_B[:, None], 0.0)
    adv_BL, returns_BL = gae(rewards_BL, values_BL, mask_BL, opts.gamma, opts.lam)
    if opts.whiten_advantages:
        adv_BL = whiten(adv_BL, mask_BL)

    # Diagnostics: explained variance of the returns by the old values.
    _, var_ret = masked_mean_var(returns_BL, mask_BL)
    _, var_res = masked_mean_var(returns_BL - values_BL, mask_BL)
    return {
        **exp,
        "old_values_BL": values_BL,
        "advantages_BL": adv_BL,
        "returns_BL": returns_BL,
        "diagnostics": {  # over the whole rollout batch
            "explained_variance": 1.0 - var_res / jnp.maximum(var_ret, 1e-8),
            "value_mean": masked_mean_var(values_BL, mask_BL)[0],
            "return_mean": masked_mean_var(returns_BL, mask_BL)[0],
        },
    }
