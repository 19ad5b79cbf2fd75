"""An RL stage's rollout settings: which objective and roles it runs, and what it refuses.

``check_config`` is the one place a rollout's settings are checked against the objective's declaration and
every role's model config; the rollout source, the builder (``gptjax.train.build``, for abstract runs too)
and the planner call it, so none of them accepts what another refuses. ``reward_at`` and ``score_rows`` say
how the experience pass scores, read the same way by the rollout and the planner.
"""

from __future__ import annotations

import importlib
import math

import jax

from gptjax import losses, model, rl
from gptjax.rl import reward, reward_terms
from gptjax.rl.policy import GENERATION_MODES

ROLES = ("policy", "value", "ref", "reward")  # PPO's; a group objective has no 'value'


def objective(config) -> losses.Objective:
    """The objective config.loss.name declares (its critic, group size, KL placement, advantages)."""
    return losses.objective(config.loss.name)


def group_advantages(config):
    """The objective's per-token ``advantages(ScoredRollout, opts) -> adv_BT`` (critic-free), or None (PPO:
    GAE over the 'value' role)."""
    return objective(config).advantages


def advantages_kwargs(config) -> dict:
    """``rl.experience``'s (and ``_experience``'s) keyword arguments for a critic-free objective: its
    ``advantages_fn`` and resolved options ``loss_opts`` (static for jit); {} when a critic's GAE is used."""
    obj = objective(config)
    if obj.advantages is None:
        return {}
    return {"advantages_fn": obj.advantages, "loss_opts": obj.options_of(config.loss)}


def reward_kl(config) -> bool:
    """Whether the objective's reward carries the rollout's KL penalty (rollout.kl_coef, kl_target): PPO's,
    RLOO's and REINFORCE++'s do; GRPO's KL is a loss term and GSPO has none."""
    return objective(config).kl == "reward"


def roles_needed(config) -> tuple[str, ...]:
    """The roles a rollout scores with: no 'value' without a critic, no 'reward' when every reward term is a
    function (``rollout.rm_weight=0``)."""
    skip = set() if objective(config).critic else {"value"}
    if not reward_terms.rm_weight(config):
        skip.add("reward")
    return tuple(r for r in ROLES if r not in skip)


def load_gold(spec: str):
    """'module:function' -> the function (a gold reward ``f(prompt, response, finished=bool)``)."""
    module, _, fn = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), fn)
    except (ImportError, AttributeError) as e:
        raise ValueError(
            f"config.rollout.gold={spec!r}: cannot import it ({e}); use 'module:function'"
        ) from None


# Bounds of the numeric rollout settings: (key, predicate, what it needs). A negative kl_coef rewards drifting
# from the reference, a negative missing_eos_penalty (subtracted from the score) rewards never ending.
BOUNDS = (
    ("batch_size", lambda v: v >= 1, "must be >= 1"),
    ("epochs", lambda v: v >= 1, "must be >= 1"),
    ("prompt_len", lambda v: v >= 1, "must be >= 1"),
    ("max_new_tokens", lambda v: v >= 1, "must be >= 1"),
    ("kl_coef", lambda v: v >= 0, "must be >= 0"),
    ("gamma", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("lam", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("reward_clip", lambda v: v >= 0, "must be >= 0 (0: no clipping)"),
    ("missing_eos_penalty", lambda v: v >= 0, "must be >= 0 (it is subtracted from the score)"),
    ("score_rows", lambda v: v >= 0, "must be >= 0 (0: sized automatically)"),
    ("generate_rows", lambda v: v >= 0, "must be >= 0 (0: all rows at once)"),
    ("max_extra_generations", lambda v: v >= 0, "must be >= 0"),
    ("tis_cap", lambda v: v >= 0, "must be >= 0 (0: no truncated importance sampling)"),
)


def check_config(config, cfgs: dict[str, model.ModelConfig], minibatch: int) -> None:
    """Clear errors for settings PPO, GRPO or RLOO cannot run with."""
    r = config.rollout
    problems = [
        f"rollout.{key}={r[key]}: {need}"
        for key, ok, need in BOUNDS
        if key in r and not (math.isfinite(r[key]) and ok(r[key]))
    ]
    problems += reward_terms.check_config(config)
    obj = objective(config)
    n, per_host = r.samples_per_prompt, r.batch_size // jax.process_count()
    if r.get("tis_cap") and obj is losses.objective("gspo"):
        problems.append(
            "rollout.tis_cap: GSPO's ratio is per sequence; per-token importance weights do not apply (set 0)"
        )
    if r.get("lora_generation", "adapters") not in GENERATION_MODES:
        problems.append(f"rollout.lora_generation={r.lora_generation!r}: use one of {GENERATION_MODES}")
    policy_cfg = cfgs.get("policy")
    if r.mesh and policy_cfg is not None and policy_cfg.lora_base_quant and r.lora_generation == "adapters":
        problems.append(
            "rollout.mesh moves the policy to another layout, which a quantised LoRA base "
            "(model.lora_base_quant) does not have: set rollout.lora_generation='merged' or drop rollout.mesh"
        )
    if r.get("dynamic_sampling"):
        if n < 2:
            problems.append("rollout.dynamic_sampling drops groups of equal rewards: samples_per_prompt >= 2")
        if reward_terms.rm_weight(config):
            problems.append(
                "rollout.dynamic_sampling needs every reward term scored before the experience pass: a "
                "reward model is not (set rollout.rm_weight=0 and use reward functions)"
            )
    if n < 1 or per_host % n:
        problems.append(
            f"rollout.samples_per_prompt={n} must be >= 1 and divide the responses per host "
            f"(rollout.batch_size={r.batch_size} over {jax.process_count()} processes), so groups stay whole"
        )
    if not obj.rl:
        problems.append(f"loss {config.loss.name!r} reads {obj.data} batches, not rollouts of prompts")
    if n < obj.min_group:
        problems.append(
            f"loss {config.loss.name!r} compares the responses to one prompt: set rollout.samples_per_prompt "
            f">= {obj.min_group} (it is {n})"
        )
    trained = set(config.get("roles") or {})
    if not obj.critic and "value" in trained:
        problems.append(
            f"loss {config.loss.name!r} trains no critic: remove config.roles.value (its advantages come "
            "from the rollout's scores)"
        )
    has_ptx = "ptx_coef" in obj.options
    if not has_ptx and config.ptx.ratio > 0:
        problems.append(f"loss {config.loss.name!r} has no ptx term: set ptx.ratio=0")
    if r.top_k or r.top_p < 1.0:
        problems.append(
            f"rollout.top_k={r.top_k} / top_p={r.top_p}: PPO's log-probs are those of the whole "
            "temperature-scaled distribution, and truncated samples would be off-policy for them; use "
            "top_k=0 and top_p=1.0 (lower rollout.temperature to sharpen sampling)"
        )
    if r.temperature <= 0:
        problems.append(
            f"rollout.temperature={r.temperature} must be > 0 (PPO samples; greedy has no log-probs)"
        )
    if r.batch_size % minibatch:
        problems.append(
            f"rollout.batch_size={r.batch_size} must be a multiple of train.batch_size={minibatch}"
        )
    if r.generate_rows and r.batch_size % (r.generate_rows * jax.process_count()):
        problems.append(
            f"rollout.generate_rows={r.generate_rows} must divide rollout.batch_size={r.batch_size} "
            f"(per host, over {jax.process_count()} processes)"
        )
    if r.kl_kind not in rl.KL_KINDS:
        problems.append(f"rollout.kl_kind={r.kl_kind!r}: use one of {rl.KL_KINDS}")
    if r.kl_target < 0 or (r.kl_target > 0 and r.kl_horizon <= 0):
        problems.append(f"rollout.kl_target={r.kl_target} needs >= 0 and kl_horizon > 0")
    if r.kl_target > 0 and obj.kl != "reward":
        where = "is the loss term loss.kl_coef" if obj.kl == "loss" else "is not penalised"
        problems.append(
            f"rollout.kl_target={r.kl_target} adapts rollout.kl_coef, which loss {config.loss.name!r} does "
            f"not use (its KL to the reference {where}): set rollout.kl_target=0"
        )
    ptx_ratio, ptx_coef = config.ptx.ratio, config.loss.get("ptx_coef", 0.0)
    if has_ptx and (ptx_ratio > 0) != (ptx_coef > 0):
        problems.append(
            f"ptx.ratio={ptx_ratio} and loss.ptx_coef={ptx_coef}: PPO-ptx needs both > 0 (plain PPO: both 0)"
        )
    heads = {"policy": "lm", "value": "scalar", "ref": "lm", "reward": "scalar"}
    missing = [name for name in roles_needed(config) if name not in cfgs]
    if missing:
        problems.append(f"loss {config.loss.name!r} needs the role(s) {missing}; roles: {sorted(cfgs)}")
    for name, head in heads.items():
        if name in cfgs and cfgs[name].head != head:
            problems.append(f"role {name!r} needs a model with a {head!r} head; it has {cfgs[name].head!r}")
    vocabs = {name: c.vocab_size for name, c in cfgs.items()}
    if len(set(vocabs.values())) > 1:
        problems.append(f"the roles must share one vocabulary; vocab sizes: {vocabs}")
    total = r.prompt_len + r.max_new_tokens
    for name, c in cfgs.items():
        if c.pos == "learned" and total > c.max_len:
            problems.append(
                f"rollout.prompt_len + max_new_tokens = {total} exceeds role {name!r}'s max_len={c.max_len}"
            )
    if problems:
        raise ValueError(f"invalid {config.stage} config:\n  " + "\n  ".join(problems))


def reward_at(config) -> str:
    """How the reward model turns per-token outputs into a score: the rollout's setting, else the one the
    reward model was trained with (its checkpoint's loss.reward_at), else 'last'."""
    if not reward_terms.rm_weight(config):
        return config.rollout.reward_at or "last"  # no reward model
    return config.rollout.reward_at or reward.trained_reward_at(config.frozen.reward.init_from)


def score_rows(config, cfgs: dict[str, model.ModelConfig], mesh) -> int:
    """Rows per scoring forward pass: ``rollout.score_rows``, or (0) as many as keep one chunk's fp32 logits
    under 2 GiB (``rl.score_chunk_rows``)."""
    r = config.rollout
    if r.get("score_rows", 0):
        if r.batch_size % r.score_rows:
            raise ValueError(
                f"rollout.score_rows={r.score_rows} must divide rollout.batch_size={r.batch_size}"
            )
        return int(r.score_rows)
    vocab = max(cfgs["policy"].vocab_size, cfgs["ref"].vocab_size)
    row_bytes = (r.prompt_len + r.max_new_tokens) * vocab * 4
    return rl.score_chunk_rows(r.batch_size, row_bytes, mesh.shape["data"] * mesh.shape["fsdp"])
