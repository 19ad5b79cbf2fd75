"""The training room: ``defaults.py`` (config sections), ``stages.py`` (the stage table), ``roles.py``
(trained and frozen models), ``optim.py``, ``state.py``, ``step.py`` (the one jitted train step),
``sources.py`` (batch sources), ``guard.py`` (non-finite steps, signals), ``loop.py`` (``run``: the one
loop) and ``console.py`` (the scripts' terminal: quiet logging, one-line errors). ``gptjax.train.run(config,
workdir)`` is the loop's public name; ``gptjax.train.setup_logging()`` is ``console.setup_logging``.
"""

import importlib


def __getattr__(name: str):
    # `gptjax.train.run` without importing the loop (and everything it builds on) with the package: the
    # step, state and optimizer modules are imported on their own by code below the loop.
    if name == "run":
        return importlib.import_module("gptjax.train.loop").run
    if name == "setup_logging":  # light: imports neither JAX nor TensorFlow, so it can quiet them first
        return importlib.import_module("gptjax.train.console").setup_logging
    raise AttributeError(f"module 'gptjax.train' has no attribute {name!r}")
