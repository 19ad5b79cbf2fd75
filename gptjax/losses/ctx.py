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
    are trained, the frozen base weights ('base', combined with the adapters before the loss sees them).
    """

    model_cfg: Any = flax.struct.field(pytree_node=False)  # the (first) trained role's config
    loss_cfg: Any = flax.struct.field(pytree_node=False, default=None)  # hashable (FrozenConfigDict)
    frozen: dict = flax.struct.field(default_factory=dict)
    frozen_cfgs: tuple = flax.struct.field(pytree_node=False, default=())  # ((name, ModelConfig), ...)
    role_cfgs: tuple = flax.struct.field(pytree_node=False, default=())  # trained roles' ((name, cfg), ...)
    scalars: dict = flax.struct.field(default_factory=dict)  # dynamic scalars, e.g. {'kl_coef': 0.02}
    denominators: dict = flax.struct.field(default_factory=dict)  # full-batch counts (set by the step)

    def cfg_of(self, name: str):
        """Model config of a frozen or trained role by name."""
        cfgs = dict(self.role_cfgs + self.frozen_cfgs)
        if name not in cfgs:
            raise KeyError(f"no role {name!r}; roles: {sorted(cfgs)}")
        return cfgs[name]


def full_params(params: Any, ctx: Ctx) -> Any:
    """Trained params plus frozen base weights when only adapters are trained."""
    base = ctx.frozen.get("base")
    if base is None:
        return params
    return lora.combine(params, base)
