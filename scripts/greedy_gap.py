"""Why PPO's greedy answers can score below the SFT model's while its sampled answers score above them.

    python scripts/greedy_gap.py --workdir runs/demo                   # after `make demo`
    python scripts/greedy_gap.py --workdir runs/demo --prompts 400     # quicker, wider error bars
    python scripts/greedy_gap.py --workdir runs/demo --ppo /tmp/ppo2 --out /tmp/ppo2   # another PPO run

On the tiny task's held-out prompts (the gold evaluator's, the first ``--prompts`` of them), for the SFT model
(``<workdir>/sft``), the PPO policy and its EMA (``--ppo``, default ``<workdir>/ppo``), against the reward
model (``<workdir>/rm``): gold reward by sampling temperature (0 = greedy), the reward model against the gold
reward where the greedy answers of SFT and PPO differ, the change per task kind, and the entropy and
probability of the greedy answers (``gptjax.research.greedy_gap``). Prints the tables and writes
``<out>/greedy_gap.json`` and ``<out>/greedy_gap.md`` (``--out`` defaults to the workdir).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

from absl import app, flags, logging

from gptjax import checkpoint, evals
from gptjax.data import get_vocabulary
from gptjax.evals import gold as gold_eval
from gptjax.research import greedy_gap, iterate
from gptjax.train import console, defaults

flags.DEFINE_string("workdir", "runs/demo", "A finished demo: its sft/, rm/ and ppo/ runs.")
flags.DEFINE_string("ppo", "", "The PPO run to analyse ('' = <workdir>/ppo).")
flags.DEFINE_string("out", "", "Where greedy_gap.json and greedy_gap.md go ('' = the workdir).")
flags.DEFINE_string("config", "configs/tiny.py", "The config file the runs came from (vocabulary, RM data).")
flags.DEFINE_integer("prompts", 2000, "Held-out prompts (the gold evaluator's, in its order).")
flags.DEFINE_integer("samples", 4, "Answers per prompt at each temperature above 0.")
flags.DEFINE_list("temperatures", ["0", "0.25", "0.5", "0.7", "1"], "Sampling temperatures (0 = greedy).")
flags.DEFINE_integer("seed", 1, "Sampling key (the gold evaluator's default: its T = 1 numbers).")
FLAGS = flags.FLAGS

SECTION = "## PPO's greedy answers on the tiny task"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup_logging()
    start = time.perf_counter()
    root = FLAGS.workdir
    sft_dir, rm_dir = os.path.join(root, "sft"), os.path.join(root, "rm")
    ppo_dir, out_dir = FLAGS.ppo or os.path.join(root, "ppo"), FLAGS.out or root
    for d in (sft_dir, rm_dir, ppo_dir):
        if not os.path.isdir(d):
            raise FileNotFoundError(
                f"{d} is missing: run `make demo` (or name the runs with --workdir / --ppo)"
            )
    rm_config = defaults.load_config(f"{FLAGS.config}:stage=rm")
    vocab = get_vocabulary(rm_config.data)
    opts = evals.evaluator("gold").options_of({"prompts": FLAGS.prompts})
    prompts, gold = gold_eval.prompts_of(opts), gold_eval.gold_of(opts)
    policies = {
        "sft": checkpoint.load_model(sft_dir),
        "ppo": checkpoint.load_model(ppo_dir, role="policy"),
        "ppo_ema": checkpoint.load_model(ppo_dir, role="policy", ema=True),
    }
    reward_fn = gold_eval.reward_fn(evals.Inputs.of_models({}, vocab), rm_dir)
    res = greedy_gap.analyse(
        policies,
        vocab,
        prompts,
        gold,
        reward_fn,
        temperatures=[float(t) for t in FLAGS.temperatures],
        samples=FLAGS.samples,
        seed=FLAGS.seed,
        max_new_tokens=opts.max_new_tokens,
        batch_size=opts.batch_size,
        seq_len=rm_config.train.seq_len,
    )
    rm_reference = iterate.rm_numbers(rm_config, rm_dir, vocab, 200)
    res["rm_reference"] = {k: rm_reference[k] for k in ("pairwise_accuracy", "gold_agreement", "pairs")}
    res.update(workdir=root, ppo=ppo_dir, seconds=time.perf_counter() - start)
    command = "python scripts/greedy_gap.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        SECTION,
        "",
        f"`{command}` ({res['seconds'] / 60:.1f} min for this invocation)",
        "",
        *greedy_gap.report_lines(res, res["rm_reference"]),
    ]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "greedy_gap.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, "greedy_gap.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    logging.info("wrote %s/greedy_gap.json and greedy_gap.md", out_dir)


if __name__ == "__main__":
    console.main(main)
