"""The checkout behaves like the installed package: no folder at the repository root stands in for an
installed top-level package when Python starts there (``python -m pytest``, a REPL, a notebook), and
``gptjax.kernels`` is the top-level ``kernels/`` folder whether imported from the root or from anywhere
else."""

import importlib.metadata
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, cwd: str) -> str:
    # Plain `python -c` from `cwd`: cwd is first on sys.path, as in a REPL opened there.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_no_root_folder_is_a_regular_package_other_than_gptjax():
    installed = set(importlib.metadata.packages_distributions())
    packages = sorted(
        name
        for name in os.listdir(ROOT)
        if os.path.isfile(os.path.join(ROOT, name, "__init__.py")) and name != "gptjax"
    )
    shadowing = [name for name in packages if name in installed]
    assert not shadowing, f"root folders {shadowing} shadow installed packages of the same name"
    assert not packages, f"root folders {packages} are importable packages from the root: remove __init__.py"


def test_transformers_and_kernels_import_the_installed_packages_from_the_root():
    origin = _python(
        "import importlib.util, transformers\n"
        "from transformers import LlamaConfig\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(spec.origin if spec and spec.origin else '')\n",
        cwd=ROOT,
    )
    # The installed PyPI `kernels` (a transformers dependency) or none at all, never the checkout's folder.
    ours = os.path.join(ROOT, "kernels") + os.sep
    assert not os.path.realpath(origin).startswith(ours), f"`import kernels` from the root took {origin}"


def test_gptjax_kernels_is_the_kernels_folder_from_the_root_and_elsewhere(tmp_path):
    code = "import gptjax.kernels.flash_attention as f, os; print(os.path.realpath(f.__file__))"
    want = os.path.realpath(os.path.join(ROOT, "kernels", "flash_attention.py"))
    assert _python(code, cwd=ROOT) == want
    assert _python(code, cwd=str(tmp_path)) == want
