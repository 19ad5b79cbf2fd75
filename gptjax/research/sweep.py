"""Sweeps as code: a config file declares its grids, ``scripts/sweep.py`` runs one and writes a table + plot.

A config module defines ``get_sweeps() -> {name: Sweep}``; a sweep is a list of points, each a config arg
(e.g. ``stage=ppo``), dotted overrides and a seed:

    def get_sweeps():
        return {"kl": sweep.grid("rollout.kl_coef", [0.0, 0.02, 0.1], seeds=3)}

    python scripts/sweep.py --config configs/tiny.py --sweep kl --base runs/demo --workdir runs/sweeps

Every point trains one run (``train.run``; a finished point is not trained again, an interrupted one resumes
from its checkpoint) from the SFT / RM checkpoints under ``--base`` (values ``{sft}`` / ``{rm}`` in args and
overrides name them), then evaluates its policy (and EMA policy, where the run keeps one) on held-out prompts
against the SFT model with the same prompts and sampling keys: sampled gold reward, paired difference to SFT,
reward-model score and KL to SFT (the ``gold`` evaluator, ``gptjax.evals``). A point may instead be
best-of-n sampling of the SFT model (the ``best_of_n`` evaluator, no training). Points sharing a label are
seeds: the table reports their mean and the standard error over seeds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from gptjax import checkpoint, evals, train
from gptjax.data import get_vocabulary
from gptjax.evals import evaluate
from gptjax.research import report
from gptjax.train import defaults

PPO = "stage=ppo,sft={sft},rm={rm}"  # a point's default config arg: PPO from the base's checkpoints


@dataclasses.dataclass(frozen=True)
class Point:
    label: str  # rows of the table; points sharing a label are seeds of one setting
    arg: str = PPO  # the config file's arg
    overrides: tuple[tuple[str, Any], ...] = ()  # dotted config keys -> values
    seed: int = 0
    x: float | None = None  # where the point sits on the plot's x axis (None: by label order)
    best_of_n: int = 0  # > 0: best-of-n samples of the SFT model scored by the RM, no training

    @property
    def name(self) -> str:
        safe = "".join(ch if ch.isalnum() or ch in "-_.=" else "_" for ch in self.label)
        return f"{safe}-seed{self.seed}"


@dataclasses.dataclass(frozen=True)
class Sweep:
    points: tuple[Point, ...]
    xlabel: str = ""
    title: str = ""
    # also each policy's loss on held-out pretraining text (``evaluate.text_loss``): what PPO-ptx protects
    text_loss: bool = False
    xlog_above: float = 0.0  # > 0: the plot's x axis logarithmic above this value (grids like 0, 0.1, 1, 10)


def grid(key: str, values: Sequence, *, seeds: int = 1, arg: str = PPO, label: str = "", **fixed) -> Sweep:
    """One override key over ``values`` (x axis), each with ``seeds`` seeds, seed-major (an interrupted sweep
    has every value); ``fixed`` overrides (dotted keys written with '__' for '.') apply to every point."""
    base = tuple((k.replace("__", "."), v) for k, v in fixed.items())
    points = [
        Point(
            label=f"{label or key.split('.')[-1]}={v}",
            arg=arg,
            overrides=((key, v), *base),
            seed=s,
            x=float(v) if isinstance(v, (int, float)) else None,
        )
        for s in range(seeds)
        for v in values
    ]
    return Sweep(tuple(points), xlabel=key)


def seeds_of(point: Point, seeds: int) -> list[Point]:
    return [dataclasses.replace(point, seed=s) for s in range(seeds)]


def load_sweep(config_file: str, name: str) -> Sweep:
    """``get_sweeps()[name]`` of a config file (clear errors for a missing function or sweep)."""
    spec = importlib.util.spec_from_file_location("sweep_config", config_file)
    if spec is None or spec.loader is None:
        raise ValueError(f"--config {config_file!r}: not a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sweeps = module.get_sweeps() if hasattr(module, "get_sweeps") else {}
    if name not in sweeps:
        raise ValueError(f"{config_file} declares no sweep {name!r}; its sweeps: {sorted(sweeps)}")
    return sweeps[name]


def point_config(config_file: str, point: Point, base: str):
    """The point's config: the file at its arg, overrides applied (unknown keys: a clear error)."""
    paths = {"sft": os.path.join(base, "sft"), "rm": os.path.join(base, "rm")}
    c = defaults.load_config(f"{config_file}:{point.arg.format(**paths)}")
    c.unlock()
    for key, value in (*point.overrides, ("train.seed", point.seed)):
        value = value.format(**paths) if isinstance(value, str) else value
        node = c
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part not in node:
                raise ValueError(
                    f"sweep point {point.label!r}: config has no key {'.'.join(parts[: i + 1])!r}"
                )
            node = node[part]
        if parts[-1] not in node:
            raise ValueError(f"sweep point {point.label!r}: config has no key {key!r}")
        node[parts[-1]] = float(value) if isinstance(node[parts[-1]], float) else value
    c.lock()
    return c


class Evaluator:
    """Policies on held-out prompts against the SFT model under ``base`` (same prompts and keys): the gold,
    text_loss and best_of_n evaluators (``gptjax.evals``) with the base's SFT model as reference and its RM
    as reward model."""

    def __init__(self, config_file: str, base: str, eval_prompts: int, samples: int, text_loss: bool = False):

        self.base, self.samples, self.eval_prompts = base, samples, eval_prompts
        # held-out text: the validation split of the config file's pretraining data, at its sequence length
        self.text = defaults.load_config(f"{config_file}:stage=pretrain") if text_loss else None
        rm_config = defaults.load_config(f"{config_file}:stage=rm")
        self.vocab = get_vocabulary(rm_config.data)
        self.sft_dir, self.rm_dir = os.path.join(base, "sft"), os.path.join(base, "rm")
        self.sft = evals.load_model(self.sft_dir)
        # the RM scores at the sequence length of the config file's RM stage
        self.scoring = {
            "reward": self.rm_dir,
            "reward_seq_len": rm_config.train.seq_len,
            "prompts": eval_prompts,
        }
        self._sft_result: dict | None = None

    def measure(self, name: str, cfg_params: tuple, **opts) -> dict:

        return evals.measure(name, evals.Inputs.of_models({"policy": cfg_params}, self.vocab), **opts)

    def compare(self, policies: dict) -> dict[str, dict]:
        """The gold evaluator (sampled, with KL to SFT and the RM's score) of each policy."""
        opts = dict(samples=self.samples, greedy=False, ref=self.sft_dir, **self.scoring)
        return {name: self.measure("gold", model, **opts) for name, model in policies.items()}

    def add_text_loss(self, results: dict[str, dict], load) -> bool:
        """Each policy's held-out text loss into its results, where wanted and missing (``load(name)`` gives
        that policy's (cfg, params)); whether any was added."""
        missing = [name for name, r in results.items() if self.text is not None and "text_loss" not in r]
        for name in missing:
            d, t = self.text.data, self.text.train
            results[name].update(self.measure("text_loss", load(name), data=d, seq_len=t.seq_len))
        return bool(missing)

    def sft_result(self, cache: str) -> dict:
        if self._sft_result is None:
            if os.path.exists(cache):
                with open(cache) as f:
                    self._sft_result = json.load(f)
                changed = False
            else:
                self._sft_result = self.compare({"sft": self.sft})["sft"]
                changed = True
            changed |= self.add_text_loss({"sft": self._sft_result}, lambda _: self.sft)
            if changed:
                with open(cache, "w") as f:
                    json.dump(self._sft_result, f)
        return self._sft_result

    def best_of_n(self, n: int, seed: int) -> dict:
        """The best_of_n evaluator on the SFT model: gold and RM score of the RM-best of n samples per prompt
        (one sample pool of n per prompt, the ``seed``-th draw), KL log n - (n - 1) / n."""
        return self.measure("best_of_n", self.sft, n=n, draw=seed, **self.scoring)


def run_point(config_file: str, point: Point, base: str, root: str, evaluator: Evaluator) -> dict:
    """Train (unless finished) and evaluate one point; the 'results' key of its results.json (where the
    loop's own evaluators write too) is the resume marker."""
    workdir = os.path.join(root, point.name)

    def policies(config) -> dict:
        """The run's policy and (where it keeps one) EMA policy, each loaded when called."""
        role = "policy" if "roles" in config and "policy" in config.roles else None
        out = {"policy": lambda: checkpoint.load_model(workdir, role=role)}
        if (config.roles.policy.optim if role else config.optim).ema_decay > 0:
            out["ema"] = lambda: checkpoint.load_model(workdir, role=role, ema=True)
        return out

    out = evals.read_results(workdir)
    if "results" in out:
        # a finished point evaluated before a metric was asked for: add it from the run's checkpoints
        if evaluator.text is not None and not point.best_of_n:

            def load(name):
                return policies(point_config(config_file, point, base))[name]()

            if evaluator.add_text_loss(out["results"], load):
                evals.merge_results(workdir, out)
        return out
    os.makedirs(workdir, exist_ok=True)
    start = time.perf_counter()
    if point.best_of_n:
        results = {"policy": evaluator.best_of_n(point.best_of_n, point.seed)}
    else:
        config = point_config(config_file, point, base)
        train.run(config, workdir)
        loaded = {name: load() for name, load in policies(config).items()}
        results = evaluator.compare(loaded)
        evaluator.add_text_loss(results, loaded.__getitem__)
    sft = evaluator.sft_result(os.path.join(root, "sft_eval.json"))
    for r in results.values():
        r["gold_vs_sft"], r["gold_vs_sft_se"] = evaluate.paired_difference(r, sft)
        r.pop("examples", None)
    out = {
        "label": point.label,
        "seed": point.seed,
        "x": point.x,
        "arg": point.arg,
        "overrides": dict(point.overrides),
        "results": results,
        "wall_s": time.perf_counter() - start,
    }
    return evals.merge_results(workdir, out)


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (label, policy): means over seeds and their standard error across seeds (0 for one
    seed: then the within-run standard error over prompts is reported)."""
    rows: dict[tuple[str, str], list[dict]] = {}
    order: list[tuple[str, str]] = []
    for run in runs:
        for policy, r in run["results"].items():
            key = (run["label"], policy)
            if key not in rows:
                order.append(key)
            rows.setdefault(key, []).append({**r, "x": run["x"], "wall_s": run["wall_s"]})
    out = []
    for label, policy in order:
        rs = rows[(label, policy)]

        def stat(k, rs=rs):
            vals = np.array([r[k] for r in rs if r.get(k) is not None], np.float64)
            if not len(vals):
                return None, None
            se = vals.std(ddof=1) / math.sqrt(len(vals)) if len(vals) > 1 else None
            return float(vals.mean()), se

        gold, gold_se = stat("gold_reward_mean")
        diff, diff_se = stat("gold_vs_sft")
        if len(rs) == 1:  # one seed: the standard errors over prompts
            gold_se, diff_se = rs[0]["gold_reward_se"], rs[0]["gold_vs_sft_se"]
        out.append(
            {
                "label": label,
                "policy": policy,
                "seeds": len(rs),
                "x": rs[0]["x"],
                "gold": gold,
                "gold_se": gold_se,
                "gold_vs_sft": diff,
                "gold_vs_sft_se": diff_se,
                "rm_reward": stat("rm_reward_mean")[0],
                "kl": stat("kl_to_ref")[0],
                "text_loss": stat("text_loss")[0],
                "text_loss_se": stat("text_loss")[1],
                "wall_s": float(sum(r["wall_s"] for r in rs)),
            }
        )
    return out


def report_lines(
    name: str, sweep: Sweep, rows: list[dict], sft: dict, command: str, wall_s: float
) -> list[str]:

    def pm(v, se):
        return f"{report.fmt(v)} +- {report.fmt(se)}" if se is not None else report.fmt(v)

    text = any(r.get("text_loss") is not None for r in rows)
    table = [
        [
            r["label"],
            r["policy"],
            str(r["seeds"]),
            pm(r["gold"], r["gold_se"]),
            pm(r["gold_vs_sft"], r["gold_vs_sft_se"]),
            report.fmt(r["rm_reward"]),
            report.fmt(r["kl"]),
            *([pm(r.get("text_loss"), r.get("text_loss_se"))] if text else []),
        ]
        for r in rows
    ]
    head = ["setting", "policy", "seeds", "gold reward", "gold - SFT (paired)", "RM reward", "KL to SFT"]
    sft_text = f", held-out text loss {report.fmt(sft.get('text_loss'))}" if text else ""
    return [
        f"## Sweep `{name}`{': ' + sweep.title if sweep.title else ''}",
        "",
        f"`{command}` ({wall_s / 60:.0f} min on this machine)",
        "",
        f"SFT model: gold reward {pm(sft['gold_reward_mean'], sft['gold_reward_se'])}, RM reward "
        f"{report.fmt(sft.get('rm_reward_mean'))}{sft_text}.",
        "",
        *report.table(head + (["held-out text loss"] if text else []), table),
        "",
        "Gold reward: mean over held-out prompts of sampled answers (temperature 1); +- is the standard "
        "error across seeds (one seed: over prompts). gold - SFT pairs each prompt with the SFT model's "
        "answers under the same sampling keys."
        + (
            " Held-out text loss: nats per token on the pretraining data's validation text "
            "(``evaluate.text_loss``), what PPO-ptx's pretraining gradient protects."
            if text
            else ""
        ),
        "",
    ]


def plot(rows: list[dict], sft: dict, path: str, xlabel: str = "", xlog_above: float = 0.0) -> None:
    """Gold reward (+- its standard error), KL to SFT and (where evaluated) held-out text loss against the
    swept value, one line per policy (the run's policy, its EMA); settings without a numeric value are
    categories, in table order."""

    numeric = all(r["x"] is not None for r in rows)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    xs = {r["label"]: (r["x"] if numeric else labels.index(r["label"])) for r in rows}
    gold, kl, text = {}, {}, {}
    for policy in dict.fromkeys(r["policy"] for r in rows):
        mine = [r for r in rows if r["policy"] == policy]
        x = [xs[r["label"]] for r in mine]
        gold[policy] = {"x": x, "y": [r["gold"] for r in mine], "yerr": [r["gold_se"] or 0 for r in mine]}
        kl[policy] = {"x": x, "y": [r["kl"] for r in mine]}
        measured = [r for r in mine if r.get("text_loss") is not None]  # not best-of-n points
        if measured:
            text[policy] = {
                "x": [xs[r["label"]] for r in measured],
                "y": [r["text_loss"] for r in measured],
                "yerr": [r.get("text_loss_se") or 0 for r in measured],
            }
    gold["SFT"] = {"y": sft["gold_reward_mean"], "hline": True}
    panels = [
        {"title": "gold reward (sampled)", "ylabel": "gold reward", "series": gold},
        {"title": "KL to SFT per answer", "ylabel": "nats", "series": kl},
    ]
    if text:
        if sft.get("text_loss") is not None:
            text["SFT"] = {"y": sft["text_loss"], "hline": True}
        panels.append({"title": "held-out text loss", "ylabel": "nats per token", "series": text})
    if numeric:
        report.plot_panels(panels, path, xlabel, xlog_above=xlog_above)
    else:
        report.plot_panels(panels, path, "setting", xticks=labels)
