"""Public name ``gptjax.step``: the module ``gptjax.train.step``.

docs/architecture.md lists the public names.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("gptjax.train.step")
