"""Public name ``gptjax.state``: the module ``gptjax.train.state``.

docs/architecture.md lists the public names.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("gptjax.train.state")
