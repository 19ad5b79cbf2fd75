"""Results tables and plots shared by the demo pipeline, sweeps and benchmarks (markdown + PNG)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence


def read_metrics(workdir: str) -> list[dict]:
    """Rows of a run's metrics.jsonl ([] when there is none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_row(workdir: str, split: str = "train") -> dict:
    """The last logged row of ``split`` in a run's metrics ({} when there is none)."""
    rows = [r for r in read_metrics(workdir) if r.get("split") == split]
    return rows[-1] if rows else {}


def plot_curves(runs: dict[str, str], path: str, metric: str = "loss") -> None:
    """One panel per run ({title: workdir}): ``metric`` against step for its train and eval rows."""
    # heavy: imported only to draw
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5), squeeze=False)
    for ax, (title, workdir) in zip(axes[0], runs.items(), strict=True):
        rows = read_metrics(workdir)
        for split in ("train", "eval"):
            pts = [(r["step"], r[metric]) for r in rows if r["split"] == split and metric in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=split, marker="o" if split == "eval" else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_split(workdir: str, path: str, split: str, metrics: Sequence[str]) -> None:
    # heavy: imported only to draw
    """One panel per metric: its value against step for the rows of one split (e.g. PPO's 'rollout')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(workdir) if r.get("split") == split]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        pts = [(r["step"], r[metric]) for r in rows if metric in r]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=".")
        ax.set_title(metric)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_panels(
    panels: Sequence[dict],
    path: str,
    xlabel: str = "",
    xticks: Sequence[str] | None = None,
    xlog_above: float = 0.0,
) -> None:
    """Side-by-side panels of series: each panel {"title", "ylabel", "series": {name: {"x", "y", "yerr"
    (optional), "line" (True: a fitted curve, no markers), "scatter" (True: markers only), "hline" (True: a
    horizontal reference line at "y", no "x"), "color"}}}. ``xticks``: category names at x = 0, 1, ...
    # heavy: imported only to draw
    (their points are not joined by lines). ``xlog_above`` > 0: the x axis is logarithmic above that value
    and linear below it (symlog), for grids like 0, 0.01, 0.1, 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for name, s in panel["series"].items():
            if s.get("hline"):
                ax.axhline(s["y"], linestyle="--", color=s.get("color", "tab:green"), label=name)
            elif s.get("line"):
                ax.plot(s["x"], s["y"], "--", color=s.get("color"), label=name)
            elif s.get("scatter"):  # points without an order (e.g. one per window of rollouts)
                ax.plot(s["x"], s["y"], "o", alpha=0.7, color=s.get("color"), label=name)
            else:
                ax.errorbar(
                    s["x"],
                    s["y"],
                    yerr=s.get("yerr"),
                    marker="o",
                    capsize=3,
                    linestyle="none" if xticks else "-",
                    color=s.get("color"),
                    label=name,
                )
        if xlog_above > 0:
            ax.set_xscale("symlog", linthresh=xlog_above)
            xs = [x for s in panel["series"].values() if not s.get("hline") for x in s["x"]]
            ax.set_xlim(left=min(xs) - 0.3 * xlog_above)  # not the reference lines' automatic margin
        if xticks:
            ax.set_xticks(range(len(xticks)), xticks, rotation=15 if len(xticks) > 3 else 0, fontsize=8)
            ax.set_xlim(-0.5, len(xticks) - 0.5)
        ax.set_title(panel.get("title", ""))
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt(value, spec: str = ".3f") -> str:
    """A table cell: numbers formatted, missing values as '-'."""
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """A markdown table (cells already strings)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write(path: str, lines: Sequence[str], results: dict | None = None) -> None:
    """The report's markdown at ``path`` and, given ``results``, results.json beside it."""
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    if results is not None:
        with open(os.path.join(os.path.dirname(path), "results.json"), "w") as f:
            json.dump(results, f, indent=1)
