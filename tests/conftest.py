"""Every test sees 8 simulated CPU devices, so sharding tests can build (2, 2, 2) meshes.

Compiling dominates this suite on CPU, so the session shares one persistent XLA compilation cache: the
pytest-xdist workers and the scripts the tests start as subprocesses read what another process compiled
(the same program: a train step built again by a later ``train.run``, a resumed run, a rerun script). It
lives in a fresh directory per session, removed at exit; set JAX_COMPILATION_CACHE_DIR to use your own.
``built_once`` builds an artifact several tests read (a trained workdir) once for all workers.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    # Set here, before jax is imported, in the xdist controller: the workers inherit the same directory.
    _cache_dir = tempfile.mkdtemp(prefix="gptjax-tests-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
# A size bound turns on jax's LRU cache, which takes a file lock: two workers never read a half-written entry.
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import pytest  # noqa: E402

# The files of long end-to-end runs go first: pytest-xdist hands out what is left in ever smaller chunks, so
# the workers then finish together instead of one idling while the other runs a long last test.
LONG_FIRST = (
    "test_train.py",
    "test_ppo.py",
    "test_plan.py",
    "test_sweep.py",
    "test_multihost.py",
    "test_bon.py",
    "test_reliability.py",
)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONG_FIRST)  # stable: each file keeps its order


@pytest.fixture(scope="session")
def built_once(tmp_path_factory):
    """``built_once(name, build)`` -> a directory that ``build(path)`` filled, shared by every xdist worker
    of the session: the first worker to ask builds it under a file lock, the others wait and reuse it."""
    from filelock import FileLock

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    root = tmp_path_factory.getbasetemp() if worker is None else tmp_path_factory.getbasetemp().parent

    def get(name: str, build) -> str:
        path, done = root / f"shared-{name}", root / f"shared-{name}.done"
        with FileLock(str(root / f"shared-{name}.lock")):
            if not done.exists():
                shutil.rmtree(path, ignore_errors=True)  # a build that failed half-way in another worker
                build(str(path))
                done.touch()
        return str(path)

    return get
