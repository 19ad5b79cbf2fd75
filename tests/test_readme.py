"""README.md's commands run as written: every shell line in its code blocks that names scripts/*.py is either
run here (in README order, in a scratch directory standing for the repository root, training commands with
tiny step counts appended) or listed in NOT_RUN with the reason; a command that is neither fails the test.
What a command needs that README does not make for it (a prompts file, `make demo`'s runs) is made here, by
``prerequisites``. The scripts on gptjax's quiet terminal (QUIET) must print no native TensorFlow / CUDA lines
and no library INFO lines."""

import os
import re
import shlex
import subprocess
import sys
import time

import pytest
from helpers import ROOT, script_env

from gptjax.train import console

README = os.path.join(ROOT, "README.md")

# A command README shows that cannot run here, by a part of its text: why, and what tests it instead.
NOT_RUN = {
    "srun ": "a SLURM cluster of GPU nodes; tests/test_multihost.py runs 2 processes on localhost",
    "gcloud compute tpus": "a Cloud TPU pod slice; tests/test_multihost.py runs 2 processes on localhost",
    "--coordinator_address=host0": "a second host; tests/test_multihost.py runs 2 processes on localhost",
    "scripts/sweep.py": "15 RL and rejection-sampling runs with held-out evaluation (67 min here, "
    "docs/results.md) and no step-count flag; tests/test_sweep.py runs the script on a 2-point sweep",
    "scripts/overoptimization.py": "a reward model, best-of-n pools and a PPO run per proxy size (36 min "
    "here, docs/results.md); tests/test_bon.py tests its fits and best-of-n",
    "--recipe rlvr": "pretraining, SFT and GRPO on the arithmetic task (about 9 min here); "
    "tests/test_reward_terms.py trains GRPO on a reward function, tests/test_arith.py checks the task",
    "--rounds": "the demo's four stages then 3 rounds of labelling, RM retraining and PPO (16 min for the "
    "rounds, docs/results.md); tests/test_train.py runs scripts/pipeline.py",
}
# Appended to a training command (a later --config.x wins over README's own): 2 steps, the small batches and
# sample counts of the stage, no held-out evaluation.
TINY_RUN = ["--config.train.steps=2", "--config.train.eval_every=0"]
TINY_STAGE = {
    "rm": ["--config.normalize.examples=16"],
    "ppo": ["--config.rollout.batch_size=32", "--config.train.batch_size=16"],
    "grpo": ["--config.rollout.batch_size=32", "--config.train.batch_size=16"],
    "bon": ["--config.bon.prompts=16", "--config.bon.n=2"],
}
# Typed into the interactive chat (then end of input, as Ctrl-D)
CHAT_INPUT = "2+2?\n"
QUIET = ("train.py", "chat.py", "generate.py")  # the scripts that start with gptjax.train.console.main
OURS = {
    p for d in ("gptjax", "scripts", "kernels") for _, _, fs in os.walk(os.path.join(ROOT, d)) for p in fs
}


def readme_commands(text: str) -> list[str]:
    """Each shell line of README's code blocks that names a script under scripts/ (continuations joined)."""
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.strip()
            if line and not line.startswith("#") and re.search(r"scripts/\w+\.py", line):
                out.append(line)
    return out


def not_run_reason(command: str) -> str | None:
    return next((why for key, why in NOT_RUN.items() if key in command), None)


def prerequisites(cwd: str) -> None:
    """What README's commands read that no earlier command of it writes."""
    # generate.py --prompts_file prompts.jsonl: README describes the file's form, the user writes it
    with open(os.path.join(cwd, "prompts.jsonl"), "w") as f:
        f.write('{"prompt": "2+2?"}\n{"prompt": "name a colour"}\n')
    # the research commands start from `make demo`'s runs/demo/{sft,rm}: the ones README's stages trained
    os.makedirs(os.path.join(cwd, "runs", "demo"), exist_ok=True)
    for stage in ("sft", "rm"):
        os.symlink(os.path.join(cwd, "runs", "tiny", stage), os.path.join(cwd, "runs", "demo", stage))


def argv_of(command: str) -> tuple[list[str], str | None]:
    """(argv to run, stdin): README's python replaced by this interpreter, tiny step counts appended."""
    words = shlex.split(command, comments=True)
    words = [sys.executable if w.endswith("python") else w for w in words]
    script = next(os.path.basename(w) for w in words if re.fullmatch(r"scripts/\w+\.py", w))
    if script == "train.py":
        spec = words[words.index("--config") + 1] if "--config" in words else ""
        stage = re.search(r"stage=(\w+)", spec).group(1)
        words += TINY_RUN + TINY_STAGE.get(stage, [])
    interactive = script == "chat.py" and "--prompt" not in words
    return words, CHAT_INPUT if interactive else None


def noise(stderr: str) -> list[str]:
    """Lines a quiet terminal does not show: native TensorFlow / CUDA lines, libraries' INFO lines."""
    out = []
    for line in stderr.splitlines():
        info = re.match(r"I\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\]", line)
        if console.NATIVE_NOISE.match(line) or (info and info.group(1) not in OURS):
            out.append(line)
    return out


def test_every_readme_command_is_run_or_listed():
    with open(README) as f:
        commands = readme_commands(f.read())
    assert len(commands) >= 10, commands  # the extraction still finds README's blocks
    for key in NOT_RUN:  # a NOT_RUN entry whose command left README is stale
        assert any(key in c for c in commands), f"NOT_RUN[{key!r}] matches no README command"
    for command in commands:
        if not_run_reason(command) is None:
            argv, _ = argv_of(command)  # every command to run parses
            assert argv[0] == sys.executable, command


def needs(commands: list[list[str]], cwd: str) -> list[set[int]]:
    """For each command (argv), the earlier commands it must wait for: those whose --workdir holds a path it
    reads (``runs/...`` in its arguments; links resolved, so runs/demo/sft is runs/tiny/sft)."""

    def where(p: str) -> str:
        return os.path.realpath(os.path.join(cwd, p))

    def inside(path: str, folder: str) -> bool:
        return path == folder or path.startswith(folder + os.sep)

    writes = [where(a[a.index("--workdir") + 1]) if "--workdir" in a else None for a in commands]
    out = []
    for i, argv in enumerate(commands):
        own = argv[argv.index("--workdir") + 1] if "--workdir" in argv else None
        reads = {where(p) for p in re.findall(r"runs/[\w/.-]+", " ".join(argv)) if p != own}
        out.append({j for j in range(i) if writes[j] and any(inside(r, writes[j]) for r in reads)})
    return out


def run_all(commands: list[str], cwd: str, env: dict, workers: int = 2) -> list[tuple]:
    """Run ``commands`` in cwd, each once what it reads is written, at most ``workers`` at a time (compiling
    is one core's work). Returns (command, argv, stdin, exit status, seconds, stdout, stderr) in README
    order; a command past 600 s is killed."""
    argvs = [argv_of(c) for c in commands]
    waits, done, running = needs([a for a, _ in argvs], cwd), {}, {}
    logs = os.path.join(cwd, "logs")
    os.makedirs(logs)
    while len(done) < len(commands):
        for i, (argv, stdin) in enumerate(argvs):
            if i not in done and i not in running and len(running) < workers and waits[i] <= set(done):
                files = [open(os.path.join(logs, f"{i}.{name}"), "w+") for name in ("in", "out", "err")]
                files[0].write(stdin or "")
                files[0].seek(0)
                proc = subprocess.Popen(
                    argv, cwd=cwd, env=env, stdin=files[0], stdout=files[1], stderr=files[2]
                )
                running[i] = (proc, time.perf_counter(), files)
        time.sleep(0.2)
        for i, (proc, start, files) in list(running.items()):
            if proc.poll() is None and time.perf_counter() - start > 600:
                proc.kill()
            if proc.poll() is not None:
                out, err = (f.seek(0) or f.read() for f in files[1:])
                for f in files:
                    f.close()
                done[i] = (proc.returncode, time.perf_counter() - start, out, err)
                del running[i]
    return [(commands[i], *argvs[i], *done[i]) for i in range(len(commands))]


def test_readme_commands_run_as_written(tmp_path):
    with open(README) as f:
        commands = [c for c in readme_commands(f.read()) if not_run_reason(c) is None]
    cwd = str(tmp_path)
    for name in ("configs", "scripts"):  # the scratch directory stands for the repository root
        os.symlink(os.path.join(ROOT, name), os.path.join(cwd, name))
    prerequisites(cwd)
    env = script_env()  # the scripts' own device count
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it: the scripts quiet TensorFlow themselves
    failures, times = [], []
    start = time.perf_counter()
    for command, argv, stdin, status, seconds, stdout, stderr in run_all(commands, cwd, env):
        times.append(f"{seconds:5.1f} s  {command}")
        script = next(os.path.basename(w) for w in argv if w.endswith(".py"))
        if status != 0:
            failures.append(f"{command}\n  exit {status}:\n{stderr[-2000:]}")
        elif script in QUIET and noise(stderr):
            failures.append(f"{command}\n  not quiet:\n" + "\n".join(noise(stderr)[:10]))
        elif script == "chat.py" and stdin and "assistant: " not in stdout:
            failures.append(f"{command}\n  no reply in:\n{stdout[-500:]}")
    report = "\n".join([*times, f"{time.perf_counter() - start:5.1f} s  in all"])
    if failures:
        pytest.fail("\n\n".join(failures) + "\n\ntimes:\n" + report)
    print(report)
