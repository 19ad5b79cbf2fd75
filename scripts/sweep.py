"""Run one of a config file's sweeps (``get_sweeps()``), resuming finished points, and write its table + plot.

    make demo                                                    # the SFT and RM checkpoints, in runs/demo
    python scripts/sweep.py --config configs/tiny.py --sweep kl_coef --base runs/demo --workdir runs/sweeps
    python scripts/sweep.py --config configs/tiny.py --sweep smoke --list      # the points, without running

Writes ``<workdir>/<sweep>/report.md`` (the table), ``<sweep>.png`` (gold reward and KL against the swept
value) and ``results.json``; each point's run and evaluation live in ``<workdir>/<sweep>/<point>/``. See
``gptjax.research.sweep`` for what a point is and how it is evaluated. --verbose: library logs and the
traceback (gptjax/train/console.py).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time

from absl import app, flags, logging

from gptjax.research import report, sweep
from gptjax.train import console

flags.DEFINE_string("config", "configs/tiny.py", "Config file declaring get_sweeps() (no ':arg').")
flags.DEFINE_string("sweep", None, "The sweep's name.")
flags.DEFINE_string("base", "runs/demo", "Workdir holding the sft/ and rm/ runs the points start from.")
flags.DEFINE_string("workdir", "runs/sweeps", "Where the sweep's runs and report go.")
flags.DEFINE_integer("eval_prompts", 200, "Held-out prompts per evaluation.")
flags.DEFINE_integer("eval_samples", 4, "Sampled answers per held-out prompt.")
flags.DEFINE_integer(
    "seeds", 0, "Run only the points of the first N seeds (0: all); a later run with more resumes."
)
flags.DEFINE_bool("list", False, "Print the points and exit.")
flags.mark_flags_as_required(["sweep"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    console.setup_logging()
    if ":" in FLAGS.config:
        raise app.UsageError("--config takes the file alone; each sweep point sets its own arg")
    sw = sweep.load_sweep(FLAGS.config, FLAGS.sweep)
    if FLAGS.seeds:
        sw = dataclasses.replace(sw, points=tuple(p for p in sw.points if p.seed < FLAGS.seeds))
    if FLAGS.list:
        for p in sw.points:
            print(f"{p.name}: {p.arg} {dict(p.overrides)}{f' best-of-{p.best_of_n}' if p.best_of_n else ''}")
        return
    for stage in ("sft", "rm"):
        if not os.path.isdir(os.path.join(FLAGS.base, stage)):
            raise app.UsageError(
                f"--base {FLAGS.base!r} has no {stage}/ run: run `make demo` (or the stages) first"
            )
    root = os.path.join(FLAGS.workdir, FLAGS.sweep)
    os.makedirs(root, exist_ok=True)
    start = time.perf_counter()
    evaluator = sweep.Evaluator(
        FLAGS.config, FLAGS.base, FLAGS.eval_prompts, FLAGS.eval_samples, text_loss=sw.text_loss
    )
    runs = []
    for i, point in enumerate(sw.points):
        logging.info("=== sweep %s: point %d/%d %s", FLAGS.sweep, i + 1, len(sw.points), point.name)
        runs.append(sweep.run_point(FLAGS.config, point, FLAGS.base, root, evaluator))
    rows = sweep.summarise(runs)
    sft = evaluator.sft_result(os.path.join(root, "sft_eval.json"))
    wall = sum(r["wall_s"] for r in runs)
    command = "python scripts/sweep.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = sweep.report_lines(FLAGS.sweep, sw, rows, sft, command, wall)
    plot = os.path.join(root, f"{FLAGS.sweep}.png")
    sweep.plot(rows, sft, plot, sw.xlabel, sw.xlog_above)
    lines += [f"![{FLAGS.sweep}]({os.path.basename(plot)})", ""]
    report.write(os.path.join(root, "report.md"), lines, {"rows": rows, "runs": runs})
    print("\n".join(lines))
    print(f"report: {os.path.join(root, 'report.md')} (this invocation {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    console.main(main)
