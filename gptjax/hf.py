"""Public name ``gptjax.hf``: the module ``gptjax.interop.hf``.

docs/architecture.md lists the public names.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("gptjax.interop.hf")
