"""``Ctx``: what a loss needs besides the trained params (docs/architecture.md).

Every objective has one signature, ``loss_fn(params, batch, rng, ctx) -> (loss_sum, {name: (sum, count)})``;
``ctx`` carries the static configs (the trained roles', the frozen roles', the loss options), the frozen
roles' params (a reference policy, a reward model, LoRA's frozen base), dynamic scalars (traced, so a value
that changes during training never recompiles) and the step's full-batch denominators. It lives with the
losses because everything that scores with a model (the step, the rollout, the evaluators) builds one.
"""

from __future__ import annotations

from typing import Any

import flax.struct

from gptjax.interop import lora


@flax.struct.dataclass
class Ctx:
    """What a loss needs besides the trained params: configs (static) and frozen models' params.

    ``frozen`` holds e.g. the reference policy ('ref'), the reward model ('rm') or, when only LoRA adapters
    are trained, the frozen base weights ('base', combined with the adapters before the loss sees them: the
    base tree of a single model, {role: base tree} with roles). ``aliases`` names frozen roles that ARE a
    LoRA role's base, adapters off (a LoRA policy's reference: no second copy in memory): read every frozen
    role's params with ``frozen_params(name)``.
    """

    model_cfg: Any = flax.struct.field(pytree_node=False)  # the (first) trained role's config
    loss_cfg: Any = flax.struct.field(pytree_node=False, default=None)  # hashable (FrozenConfigDict)
    frozen: dict = flax.struct.field(default_factory=dict)
    frozen_cfgs: tuple = flax.struct.field(pytree_node=False, default=())  # ((name, ModelConfig), ...)
    role_cfgs: tuple = flax.struct.field(pytree_node=False, default=())  # trained roles' ((name, cfg), ...)
    scalars: dict = flax.struct.field(default_factory=dict)  # dynamic scalars, e.g. {'kl_coef': 0.02}
    denominators: dict = flax.struct.field(default_factory=dict)  # full-batch counts (set by the step)
    aliases: tuple = flax.struct.field(pytree_node=False, default=())  # ((frozen name, LoRA role), ...)

    def cfg_of(self, name: str):
        """Model config of a frozen or trained role by name."""
        cfgs = dict(self.role_cfgs + self.frozen_cfgs)
        if name not in cfgs:
            raise KeyError(f"no role {name!r}; roles: {sorted(cfgs)}")
        return cfgs[name]

    def frozen_params(self, name: str) -> Any:
        """A frozen role's params: its own, or the base of the LoRA role it aliases (``aliases``)."""
        if name in self.frozen:
            return self.frozen[name]
        for alias, role in self.aliases:
            if alias == name:
                return base_of(self, role)
        raise KeyError(f"no frozen role {name!r}; frozen roles: {[n for n, _ in self.frozen_cfgs]}")

    def frozen_models(self) -> dict:
        """{name: params} of every frozen role (aliases resolved; LoRA's base is not a role)."""
        return {name: self.frozen_params(name) for name, _ in self.frozen_cfgs}


def single(ctx: Ctx) -> bool:
    """Whether the trained params are one model's own tree (not keyed by role)."""
    return not ctx.role_cfgs or (len(ctx.role_cfgs) == 1 and ctx.role_cfgs[0][0] == SINGLE)


SINGLE = "model"  # the one trained role of a single-model stage (gptjax.train.roles.SINGLE)


def base_of(ctx: Ctx, role: str) -> Any:
    """The frozen base weights of LoRA role ``role``."""
    base = ctx.frozen.get("base")
    if base is None or (not single(ctx) and role not in base):
        raise KeyError(f"role {role!r} has no frozen LoRA base")
    return base if single(ctx) else base[role]


def full_params(params: Any, ctx: Ctx) -> Any:
    """Trained params plus frozen base weights when only adapters are trained (keyed by role: each LoRA
    role's adapters on its base, other roles as they are)."""
    base = ctx.frozen.get("base")
    if base is None:
        return params
    if not single(ctx):  # the roles ``params`` holds (an EMA may keep only some)
        base = {name: tree for name, tree in base.items() if name in params}
    return lora.combine(params, base)
