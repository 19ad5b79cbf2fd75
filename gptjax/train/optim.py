"""Optimizer: optax schedule (warmup + cosine / linear / constant) and clipped AdamW with a decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(optim_cfg: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup to ``lr`` (step 0 already gets lr / warmup), then decay to ``lr * min_lr_ratio``."""
    lr, warmup = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
    end = lr * float(optim_cfg.min_lr_ratio)
    decay_steps = max(int(total_steps) - warmup, 1)
    kind = optim_cfg.schedule
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif kind == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif kind == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"optim.schedule={kind!r}: use one of {SCHEDULES}")
    if warmup == 0:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(lr / warmup, lr, warmup - 1 if warmup > 1 else 1), decay], [warmup]
    )


def decay_mask(params: Any) -> Any:
    """Weight decay on weight matrices and embeddings only; biases, norm scales and heads' scalars are not.

    Decided by the leaf's name in gptjax.model's layout: weights are named w*, embeddings embed / pos_embed /
    lm_head (shape alone can't tell: a per-head q bias [layers, H, E] is not a matrix).
    """

    def is_decayed(path, _):
        name = str(getattr(path[-1], "key", path[-1]))
        return name.startswith("w") or name in ("embed", "pos_embed", "lm_head")

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(optim_cfg: Any, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (InstructGPT: b1=0.9, b2=0.95) on the schedule."""
    chain = []
    if optim_cfg.clip_norm and optim_cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
    chain.append(
        optax.adamw(
            make_schedule(optim_cfg, total_steps),
            b1=float(optim_cfg.b1),
            b2=float(optim_cfg.b2),
            eps=float(optim_cfg.eps),
            weight_decay=float(optim_cfg.weight_decay),
            mask=decay_mask,
        )
    )
    return optax.chain(*chain)
