"""Every test sees 8 simulated CPU devices, so sharding tests can build (2, 2, 2) meshes.

No persistent XLA compilation cache: with one shared by the pytest-xdist workers, a worker aborted inside
XLA running an executable another test had cached (test_evals' resumed evaluator run, 3 times in 4 with
test_reliability_resume beside it; never with the cache off), and the suite is no slower without it. Set
JAX_COMPILATION_CACHE_DIR (and JAX_ENABLE_COMPILATION_CACHE=true) to use one anyway.
``built_once`` builds an artifact several tests read (a trained workdir) once for all workers; the session
fixtures below (``pretrained``, ``sft``, ``rl_base``, ``small_base``) are the runs several files start from.
What test files share as code (configs, fake workdirs, log readers) is in ``helpers.py``.
"""

import os
import shutil

# LLVM's optimisation level 0: the tests' programs are small and run a few steps, so code generation, not
# execution, is where the time goes (about a third less CPU time for the suite); HLO optimisations still run.
# (A worker once died inside XLA in test_evals with it, and once without it: the flag is not the cause.)
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")  # set before jax is imported (module doc)

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


# --------------------------------------------------------------------------------------------------
# Runs several test files start from, each made once per session (tests read them and never write to them)


@pytest.fixture(scope="session")
def pretrained(built_once):
    """One pretraining run of tests/small_config.py (evaluated at its last step), for every test that starts
    from a pretrained model."""
    from helpers import PRETRAIN_STEPS, tiny_config

    from gptjax import train

    c = tiny_config(
        "pretrain",
        **{"train.steps": PRETRAIN_STEPS, "train.eval_every": PRETRAIN_STEPS, "optim.lr": 3e-3},
    )
    return built_once("pretrain", lambda workdir: train.run(c, workdir))


@pytest.fixture(scope="session")
def sft(built_once, pretrained):
    """SFT from ``pretrained``: the start of the reward-model and DPO stages."""
    from helpers import SFT_STEPS, tiny_config

    from gptjax import train

    c = tiny_config("sft", **{"train.steps": SFT_STEPS, "train.init_from": pretrained})
    return built_once("sft", lambda workdir: train.run(c, workdir))


@pytest.fixture(scope="session")
def rl_base(built_once):
    """(sft, rm): random SFT and reward-model workdirs of ``helpers.rl_model_cfg``'s shapes, where the RL
    stages' tests start (only the plumbing is under test there, not what the models know)."""
    import helpers

    cfgs = {"sft": helpers.rl_model_cfg(), "rm": helpers.rl_model_cfg("scalar")}
    root = built_once("rl_base", lambda path: helpers.save_random_base(path, cfgs))
    return os.path.join(root, "sft"), os.path.join(root, "rm")


@pytest.fixture(scope="session")
def small_base(built_once):
    """A directory with random SFT and reward-model workdirs (``sft/``, ``rm/``) of tests/small_config.py's
    shapes, what ``make demo`` leaves in runs/demo for a sweep or rejection sampling to start from."""
    import helpers

    from gptjax import model
    from gptjax.train import defaults

    def stage_cfg(stage):
        c = defaults.load_config(f"{helpers.SMALL_CONFIG}:stage={stage}")
        return model.config_from_dict(c.model.to_dict())

    cfgs = {stage: stage_cfg(stage) for stage in ("sft", "rm")}
    return built_once("small_base", lambda path: helpers.save_random_base(path, cfgs))
