"""What an evaluator is: one typed declaration per evaluator module, found by name (docs/architecture.md).

Each evaluator module ends with ``EVALUATOR = Evaluator(...)``: its function ``fn(inputs, opts) -> dict``,
the trained model it measures (the LM policy, a scalar-head model, or none), the options that name other
models it loads (a reference, a reward model) and its options with their defaults. The loop
(``gptjax.evals.runner``), the pipeline, the sweeps and the overoptimization study all call evaluators
through this one accessor, so a new evaluator is one file; a user's is any ``module:function``.

    ev = gptjax.evals.evaluator("gold")                     # or "mypkg.checks:accuracy"
    out = ev.run(Inputs.of_models({"policy": (cfg, params)}, vocab), {"samples": 2})

``fn`` returns numbers (what the loop logs and saves) and, where a caller wants them, details that are not
numbers (each prompt's mean, a few examples): the loop keeps the numbers only.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
from ml_collections import ConfigDict, FrozenConfigDict

from gptjax import checkpoint, model

HEADS = ("lm", "scalar", "none")
# Keys of a config.evals entry that belong to the loop, not to the evaluator's options.
SCHEDULE_KEYS = ("fn", "every", "role", "ema")


@dataclasses.dataclass
class Inputs:
    """What an evaluator sees: the step, the run's model configs and params by role (trained roles' current
    params, frozen roles' params), EMA params where kept, the vocabulary, the run config and workdir, a key.

    A script evaluating checkpoints builds one with ``of_models``."""

    step: int
    cfgs: Mapping[str, model.ModelConfig]
    params: Mapping[str, Any]
    vocab: Any
    config: ConfigDict | None = None
    ema_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    trained: tuple[str, ...] = ()  # the trained roles, in the stage's order (the rest are frozen)
    mesh: Any = None
    workdir: str = ""
    rng: jax.Array | None = None

    @classmethod
    def of_models(cls, models: Mapping[str, tuple[model.ModelConfig, Any]], vocab, **kw) -> Inputs:
        """Inputs for models loaded by hand, each {role: (cfg, params)} counted as trained."""
        return cls(
            step=kw.pop("step", 0),
            cfgs={k: c for k, (c, _) in models.items()},
            params={k: p for k, (_, p) in models.items()},
            vocab=vocab,
            trained=tuple(models),
            **kw,
        )

    def model(self, head: str = "lm", role: str = "", ema: bool = False) -> tuple[model.ModelConfig, Any]:
        """(cfg, params) of ``role``, or of the first trained role with this head (LM: the policy)."""
        if not role:
            found = [r for r in self.trained if self.cfgs[r].head == head]
            if not found:
                raise ValueError(
                    f"no trained role has a {head!r} head (roles: {list(self.trained)}): name one"
                )
            role = found[0]
        if role not in self.params:
            raise ValueError(f"no role {role!r}; roles: {sorted(self.params)}")
        if ema:
            if role not in self.ema_params:
                raise ValueError(f"role {role!r} keeps no EMA weights (optim.ema_decay is 0)")
            return self.cfgs[role], self.ema_params[role]
        return self.cfgs[role], self.params[role]

    def load(self, ref: str) -> tuple[model.ModelConfig, Any]:
        """A model named by an option: '@ROLE' is the run's own role (e.g. '@ref', '@reward'), anything
        else a workdir or Hugging Face directory, optionally '#ROLE' and '#ema' after it
        ('runs/demo/ppo#policy')."""
        if ref.startswith("@"):
            return self.model(role=ref[1:])
        path, *parts = ref.split("#")
        ema = "ema" in parts
        role = next((p for p in parts if p != "ema"), None)
        return load_model(path, role, ema)


def load_model(path: str, role: str | None = None, ema: bool = False) -> tuple[model.ModelConfig, Any]:
    """``checkpoint.load_model``, kept while the checkpoint is the same: a frozen model an evaluator reads
    at every evaluation is read once."""
    step = None if checkpoint.is_hf_dir(path) else checkpoint.load_meta(path)[0]
    return _load_model(path, role, ema, step)


@functools.lru_cache(maxsize=4)
def _load_model(path: str, role: str | None, ema: bool, step: int | None):
    return checkpoint.load_model(path, step, role=role, ema=ema)


def import_spec(spec: str, where: str) -> Any:
    """'module:name' -> that object; a clear error naming the config key ``where`` otherwise."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"{where}={spec!r}: use 'module:function'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{where}={spec!r}: cannot import it ({e})") from None


@dataclasses.dataclass(frozen=True, eq=False)
class Evaluator:
    """One evaluator's declaration (module doc)."""

    fn: Callable[[Inputs, FrozenConfigDict], dict[str, Any]]
    head: str = "lm"  # the trained model it measures: the LM policy, a scalar-head model, or none
    models: tuple[str, ...] = ()  # its options that name models it loads (Inputs.load: '@ROLE' or a path)
    options: Mapping[str, Any] | None = dataclasses.field(default_factory=dict)  # None: any (a user's fn)

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"invalid Evaluator: head={self.head!r} is not one of {HEADS}")
        missing = [m for m in self.models if self.options is not None and m not in self.options]
        if missing:
            raise ValueError(f"invalid Evaluator: models {missing} are not among its options")

    def options_of(self, given: Mapping | None = None, where: str = "options") -> FrozenConfigDict:
        """Its options: the defaults, each overridden where ``given`` (a config.evals entry or a dict) names
        it; an unknown key is an error naming ``where``."""
        given = {k: v for k, v in dict(given or {}).items() if k not in SCHEDULE_KEYS}
        if self.options is None:
            return FrozenConfigDict(given)
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {unknown}; options: {sorted(self.options)}")
        return FrozenConfigDict({**self.options, **given})

    def run(self, inputs: Inputs, given: Mapping | None = None) -> dict[str, Any]:
        return self.fn(inputs, self.options_of(given))


def evaluator(name: str, where: str = "evaluator") -> Evaluator:
    """The evaluator ``name``: a built-in (module ``gptjax.evals.<name>``'s EVALUATOR) or 'module:name', an
    Evaluator or a plain function ``fn(inputs, opts) -> dict`` (measuring no declared model, any options)."""
    if ":" in name:
        obj = import_spec(name, where)
        if isinstance(obj, Evaluator):
            return obj
        if not callable(obj):
            raise ValueError(f"{where}={name!r} is neither an Evaluator nor a function")
        return Evaluator(fn=obj, head="none", options=None)
    module = f"gptjax.evals.{name}"
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        mod = None
    spec = getattr(mod, "EVALUATOR", None)
    if not isinstance(spec, Evaluator):
        raise ValueError(
            f"{where}={name!r}: no such evaluator; built-ins: {list(BUILT_INS)}, or 'module:function'"
        )
    return spec


BUILT_INS = ("gold", "kl", "rm_accuracy", "text_loss", "best_of_n")


def measure(name: str, inputs: Inputs, **opts) -> dict[str, Any]:
    """Run the evaluator ``name`` once with these options (the scripts' entry point)."""
    return evaluator(name).run(inputs, opts)


def numbers(out: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of an evaluator's result (what is logged and saved)."""
    return {
        k: float(v)
        for k, v in out.items()
        if (isinstance(v, (int, float)) and not isinstance(v, bool)) or (hasattr(v, "dtype") and v.ndim == 0)
    }
