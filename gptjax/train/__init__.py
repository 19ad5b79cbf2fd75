"""The training room: ``defaults.py`` (config sections), ``stages.py`` (the stage table), ``roles.py``
(trained and frozen models), ``optim.py``, ``state.py``, ``step.py`` (the one jitted train step),
``sources.py`` (batch sources), ``guard.py`` (non-finite steps, signals) and ``loop.py`` (``run``: the one
loop). ``gptjax.train.run(config, workdir)`` is the loop's public name.
"""

import importlib


def __getattr__(name: str):
    # `gptjax.train.run` without importing the loop (and everything it builds on) with the package: the
    # step, state and optimizer modules are imported on their own by code below the loop.
    if name in ("run", "setup_logging"):
        return getattr(importlib.import_module("gptjax.train.loop"), name)
    raise AttributeError(f"module 'gptjax.train' has no attribute {name!r}")
