"""Reward-model overoptimization on the tiny task (Gao et al. 2022): proxy RMs of growing data, best-of-n and
PPO against each, gold and proxy reward against d = sqrt(KL), the two functional forms fitted.

    make demo                                   # the SFT model the proxies and policies start from
    python scripts/overoptimization.py --base runs/demo --workdir runs/overopt

For each proxy size (``--sizes``: ranked prompts, K = 4 responses each, from the simulated labelers): an RM
trained from the SFT model (1 epoch, at least ``--min_rm_steps`` steps) and normalised as the RM stage does;
best-of-n of the SFT model for n = 1 .. ``--n_max`` (one pool of samples per held-out prompt, scored by every
proxy; KL = log n - (n - 1) / n) and a PPO run against the proxy (critic from it, KL beta ``--kl_coef``),
whose rollouts give (KL to SFT, gold, proxy) points. The gold gain (gold - the SFT policy's) is fitted with
d (alpha - beta d) for best-of-n and d (alpha - beta log d) for PPO. Writes report.md, overoptimization.png
and results.json to the workdir; finished RMs and PPO runs are not trained again.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from gptjax import checkpoint, evals, train
from gptjax.data import get_vocabulary
from gptjax.evals import gold as gold_eval
from gptjax.research import report
from gptjax.rl import bon
from gptjax.train import defaults

flags.DEFINE_string("base", "runs/demo", "Workdir holding the sft/ run.")
flags.DEFINE_string("workdir", "runs/overopt", "Where the proxies, PPO runs and the report go.")
flags.DEFINE_list("sizes", ["100", "300", "1000", "3000"], "Ranked prompts per proxy reward model.")
flags.DEFINE_integer("min_rm_steps", 30, "RM steps at least (small proxies see their data several times).")
flags.DEFINE_integer("n_max", 64, "Best-of-n pool: samples per held-out prompt.")
flags.DEFINE_integer("eval_prompts", 100, "Held-out prompts for best-of-n.")
flags.DEFINE_float("kl_coef", 0.02, "PPO's KL beta (InstructGPT's; lower lets PPO travel further).")
flags.DEFINE_integer("ppo_steps", 0, "PPO steps (0: the tiny config's).")
flags.DEFINE_integer("window", 3, "Rollouts averaged into one PPO point (rollout metrics are noisy).")
FLAGS = flags.FLAGS

CONFIG = "configs/tiny.py"


def train_proxy(size: int, root: str) -> str:

    workdir = os.path.join(root, f"rm_{size}")
    c = defaults.load_config(f"{CONFIG}:stage=rm")
    c.unlock()
    c.data.tiny.num_rank = size
    c.train.steps = max(FLAGS.min_rm_steps, math.ceil(size / c.train.batch_size))
    c.train.checkpoint_every = c.train.eval_every = c.train.steps
    c.train.init_from = os.path.join(FLAGS.base, "sft")
    try:
        done = checkpoint.load_meta(workdir)[0] >= c.train.steps
    except FileNotFoundError:
        done = False
    if not done:
        logging.info("=== proxy RM on %d ranked prompts, %d steps -> %s", size, c.train.steps, workdir)
        train.run(c, workdir)
    return workdir


def train_ppo(rm_dir: str, root: str, size: int) -> str:

    workdir = os.path.join(root, f"ppo_{size}")
    sft = os.path.join(FLAGS.base, "sft")
    c = defaults.load_config(f"{CONFIG}:stage=ppo,sft={sft},rm={rm_dir}")
    c.unlock()
    c.rollout.kl_coef = FLAGS.kl_coef
    if FLAGS.ppo_steps:
        c.train.steps = c.train.checkpoint_every = FLAGS.ppo_steps
    try:
        done = checkpoint.load_meta(workdir)[0] >= c.train.steps
    except FileNotFoundError:
        done = False
    if not done:
        logging.info("=== PPO against the proxy of %d prompts -> %s", size, workdir)
        train.run(c, workdir)
    return workdir


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")

    train.setup_logging()
    if not os.path.isdir(os.path.join(FLAGS.base, "sft")):
        raise app.UsageError(f"--base {FLAGS.base!r} has no sft/ run: run `make demo` first")
    root = FLAGS.workdir
    os.makedirs(root, exist_ok=True)
    start = time.perf_counter()
    sizes = [int(s) for s in FLAGS.sizes]
    rm_config = defaults.load_config(f"{CONFIG}:stage=rm")
    vocab = get_vocabulary(rm_config.data)
    proxies = {size: train_proxy(size, root) for size in sizes}

    # best-of-n: one pool of SFT samples, scored by every proxy
    # the evaluators' held-out prompts, gold reward and reward-model scorer (``gptjax.evals``)
    gold_opts = evals.evaluator("gold").options_of({"prompts": FLAGS.eval_prompts})
    prompts, gold = gold_eval.prompts_of(gold_opts), gold_eval.gold_of(gold_opts)
    no_models = evals.Inputs.of_models({}, vocab)

    def scorer(rm_dir):
        return gold_eval.reward_fn(no_models, rm_dir, rm_config.train.seq_len)

    sft = evals.load_model(os.path.join(FLAGS.base, "sft"))
    pool_path = os.path.join(root, "bon_pool.json")
    if os.path.exists(pool_path):
        with open(pool_path) as f:
            pool = json.load(f)
    else:
        first = proxies[sizes[0]]
        scored = bon.sample_and_score(
            *sft,
            vocab,
            prompts,
            n=FLAGS.n_max,
            rng=jax.random.key(5),
            reward_fn=scorer(first),
            gold=gold,
        )
        pool = {"texts": scored["texts"], "gold_BN": scored["gold_BN"].tolist()}
        with open(pool_path, "w") as f:
            json.dump(pool, f)
    gold_BN = np.asarray(pool["gold_BN"])
    ns = [2**i for i in range(int(math.log2(FLAGS.n_max)) + 1)]
    results: dict = {"sizes": sizes, "bon": {}, "ppo": {}, "fits": {}}
    scores_path = os.path.join(root, "proxy_scores.json")  # each proxy's scores of the pool, once
    scores = json.load(open(scores_path)) if os.path.exists(scores_path) else {}
    for size, rm_dir in proxies.items():
        if str(size) not in scores:
            score = scorer(rm_dir)
            scores[str(size)] = [
                np.concatenate(score([(p, list(t))])).tolist()
                for p, t in zip(prompts, pool["texts"], strict=True)
            ]
            with open(scores_path, "w") as f:
                json.dump(scores, f)
        proxy_BN = np.asarray(scores[str(size)])
        curve = bon.best_of_n_curve(proxy_BN, gold_BN, ns)
        results["bon"][size] = curve

    # PPO against each proxy: (KL, gold, proxy) per window of rollouts
    for size, rm_dir in proxies.items():
        ppo_dir = train_ppo(rm_dir, root, size)
        rows = [r for r in report.read_metrics(ppo_dir) if r.get("split") == "rollout"]
        results["ppo"][size] = bon.rollout_points(rows, FLAGS.window)

    # fits: gold gain relative to the SFT policy (best-of-1 / the first PPO window)
    panels = {"bon": {}, "ppo": {}}
    for i, size in enumerate(sizes):
        color = f"C{i}"
        curve = results["bon"][size]
        d = np.array([r["d"] for r in curve])
        gain = np.array([r["gold"] for r in curve]) - curve[0]["gold"]
        a, b = bon.fit_bon(d, gain)
        pts = results["ppo"][size]
        d_rl = np.array([p["d"] for p in pts])
        gain_rl = np.array([p["gold"] for p in pts]) - results["bon"][size][0]["gold"]
        a_rl, b_rl = bon.fit_rl(d_rl, gain_rl)
        results["fits"][size] = {"bon_alpha": a, "bon_beta": b, "rl_alpha": a_rl, "rl_beta": b_rl}
        grid_d = np.linspace(0, max(d.max(), d_rl.max() if len(d_rl) else 0), 50)
        panels["bon"][f"{size}"] = {"x": d.tolist(), "y": gain.tolist(), "color": color}
        panels["bon"][f"{size} fit"] = {
            "x": grid_d.tolist(),
            "y": bon.bon_form(grid_d, a, b).tolist(),
            "line": True,
            "color": color,
        }
        panels["ppo"][f"{size}"] = {
            "x": d_rl.tolist(),
            "y": gain_rl.tolist(),
            "scatter": True,
            "color": color,
        }
        panels["ppo"][f"{size} fit"] = {
            "x": grid_d.tolist(),
            "y": bon.rl_form(grid_d, a_rl, b_rl).tolist(),
            "line": True,
            "color": color,
        }
    plot = os.path.join(root, "overoptimization.png")
    report.plot_panels(
        [
            {
                "title": "best-of-n: gold gain vs d (proxy RM size)",
                "ylabel": "gold - SFT",
                "series": panels["bon"],
            },
            {"title": "PPO: gold gain vs d (proxy RM size)", "ylabel": "gold - SFT", "series": panels["ppo"]},
        ],
        plot,
        "d = sqrt(KL to SFT)",
    )
    wall = time.perf_counter() - start
    command = "python scripts/overoptimization.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [
        "## Reward-model overoptimization",
        "",
        f"`{command}` ({wall / 60:.0f} min for this invocation)",
        "",
        *report.table(
            [
                "proxy RM: ranked prompts",
                "best-of-n alpha",
                "best-of-n beta",
                "PPO alpha",
                "PPO beta",
                f"best-of-{ns[-1]} gold gain",
                f"best-of-{ns[-1]} proxy",
                "PPO final gold gain",
                "PPO final KL",
            ],
            [
                [
                    str(size),
                    report.fmt(f["bon_alpha"]),
                    report.fmt(f["bon_beta"]),
                    report.fmt(f["rl_alpha"]),
                    report.fmt(f["rl_beta"]),
                    report.fmt(results["bon"][size][-1]["gold"] - results["bon"][size][0]["gold"]),
                    report.fmt(results["bon"][size][-1]["proxy"]),
                    report.fmt(results["ppo"][size][-1]["gold"] - results["bon"][size][0]["gold"])
                    if results["ppo"][size]
                    else "-",
                    report.fmt(results["ppo"][size][-1]["kl"]) if results["ppo"][size] else "-",
                ]
                for size, f in results["fits"].items()
            ],
        ),
        "",
        f"![overoptimization]({os.path.basename(plot)})",
        "",
    ]
    report.write(os.path.join(root, "report.md"), lines, results)
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
