"""Public name ``gptjax.sample``: the module ``gptjax.model.sample``.

docs/architecture.md lists the public names.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("gptjax.model.sample")
