"""What an objective is: one typed declaration per loss module, found by name.

Each loss module ends with ``OBJECTIVE = Objective(...)``: the loss function and everything the rest of the
program needs to know to run it (its options with their defaults, the data it reads, the frozen roles it
scores with, whether it trains a critic, how many responses per prompt it compares, where its KL to the
reference lives, its full-batch denominators, and for critic-free RL its per-token advantages). The loop,
the rollout, the config defaults and the planner read these fields and nothing else of the module, so a new
objective is one file plus one line in the stage table (``gptjax.train.stages``).

    obj = gptjax.losses.objective("grpo")          # or a dotted module path: "mypkg.my_loss"
    opts = obj.options_of(ctx.loss_cfg)            # the defaults, overridden by config.loss
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
from ml_collections import FrozenConfigDict

from gptjax.data import formats

# The data layer's batch formats (gptjax.data.formats): packed text, demonstrations, K ranked responses,
# prompts.
DATA_FORMATS = formats.NAMES
# Where an objective's KL to the reference lives: the per-token penalty in the rollout's reward
# (rollout.kl_coef, kl_kind, kl_target), a term of the loss (its own option), or nowhere.
KL_PLACES = ("reward", "loss", "none")


class ScoredRollout(NamedTuple):
    """What a critic-free objective's ``advantages`` sees of one rollout batch (``gptjax.rl.experience``).

    Per-token arrays are [B, T] aligned with the row's tokens (as ``gptjax.rl.gae``'s): T spans the whole row
    (prompt and response), and ``mask_BT`` is True on the response tokens, EOS included.
    """

    score_B: jax.Array  # the reward model's score (reward_at, missing-EOS penalty, norm, clip), no KL in it
    kl_BT: jax.Array  # per-token KL(pi_old || ref) estimate of rollout.kl_kind, 0 off the mask
    mask_BT: jax.Array
    kl_coef: jax.Array  # rollout.kl_coef (beta; the adaptive controller's current value)
    group_size: int  # rollout.samples_per_prompt: the responses to one prompt sit in adjacent rows


@dataclasses.dataclass(frozen=True, eq=False)
class Objective:
    """One objective's declaration (module doc). ``eq=False``: compared and hashed by identity, so an
    objective's functions can be static arguments of jitted code."""

    loss_fn: Callable  # loss_fn(params, batch, rng, ctx) -> (loss_sum, {name: (sum, count)})
    # the batch formats it reads (DATA_FORMATS); a stage reads the first unless it names another
    data: tuple[str, ...]
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config.loss.<key> defaults
    frozen: tuple[str, ...] = ()  # frozen roles it reads from ctx.frozen ('ref', 'reward')
    critic: bool = False  # RL: trains a value role ('value') beside the policy; its advantages are GAE's
    min_group: int = 1  # RL: the fewest rollout.samples_per_prompt it can learn from
    kl: str = "none"  # KL_PLACES
    denominators: Callable | None = None  # (batch, ctx) -> {name: full-batch count}, when terms differ
    advantages: Callable | None = None  # critic-free RL: (ScoredRollout, opts) -> adv_BT, 0 off the mask

    def __post_init__(self):
        unknown = [d for d in self.data if d not in DATA_FORMATS]
        problems = [f"data format {d!r} is not one of {DATA_FORMATS}" for d in unknown]
        if not self.data:
            problems.append("it reads no data format")
        if self.kl not in KL_PLACES:
            problems.append(f"kl={self.kl!r} is not one of {KL_PLACES}")
        if self.min_group < 1:
            problems.append(f"min_group={self.min_group} must be >= 1")
        rl = "prompts" in self.data
        if rl and not self.critic and self.advantages is None:
            problems.append("a critic-free RL objective needs advantages(scored_rollout, opts) -> adv_BT")
        if self.advantages is not None and (self.critic or not rl):
            problems.append("advantages belong to critic-free RL objectives (data 'prompts', critic=False)")
        if not rl and (self.critic or self.min_group > 1 or self.kl == "reward"):
            problems.append("critic, min_group and kl='reward' describe rollouts: the data must be 'prompts'")
        if problems:
            raise ValueError("invalid Objective: " + "; ".join(problems))

    @property
    def rl(self) -> bool:
        """Trains from rollouts (generate -> score -> advantages), not from a data iterator."""
        return "prompts" in self.data

    def options_of(self, loss_cfg: Mapping | None) -> FrozenConfigDict:
        """The options, each from ``loss_cfg`` (config.loss, or a test's partial dict) where given, else its
        default; hashable, so jitted code can take it as a static argument."""
        given = dict(loss_cfg.items()) if loss_cfg is not None else {}
        return FrozenConfigDict({**self.options, **given})


def module_name(name: str) -> str:
    """'grpo' -> 'gptjax.losses.grpo'; a dotted path is a module of its own."""
    return name if "." in name else f"gptjax.losses.{name}"


def objective(name: str) -> Objective:
    """The ``OBJECTIVE`` of the loss module ``name`` (config.loss.name): a module of gptjax.losses, or any
    importable module path containing a dot."""
    module = module_name(name)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        raise ValueError(f"config.loss.name={name!r}: no module {module}") from None
    spec = mod.__dict__.get("OBJECTIVE")
    if not isinstance(spec, Objective):
        raise ValueError(
            f"config.loss.name={name!r}: module {module} declares no OBJECTIVE = gptjax.losses.Objective(...)"
        )
    return spec
