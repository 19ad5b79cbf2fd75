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


# A rollout metric -> the evaluators' name for the same quantity on held-out prompts (gptjax.evals)
HELD_OUT = {"reward": "rm_reward_mean", "kl": "kl_to_ref", "gold_reward": "gold_reward_mean"}
TITLES = {
    "reward": "reward-model reward",
    "kl": "KL to the reference (per response)",
    "gold_reward": "gold reward",
    "policy_loss": "policy loss",
    "value_loss": "value loss",
    "accuracy": "accuracy",
}


def ema(ys: Sequence[float], span: float) -> list[float]:
    """Exponential moving average of ``ys`` with weight 2 / (span + 1) on each new value, debiased (the
    first values are not pulled towards 0): the smoothed line of a noisy curve."""
    alpha, acc, weight, out = 2.0 / (span + 1.0), 0.0, 0.0, []
    for y in ys:
        acc = (1 - alpha) * acc + alpha * y
        weight = (1 - alpha) * weight + alpha
        out.append(acc / weight)
    return out


def default_span(n: int) -> float:
    """The EMA span for a curve of ``n`` points: a fifth of it, at least 3 (no smoothing below 5 points)."""
    return 1.0 if n < 5 else max(3.0, n / 5)


def _pyplot():
    # heavy: imported only to draw
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smoothed(ax, pts: list[tuple[float, float]], label: str, color: str) -> None:
    """Raw points faint, their EMA bold."""
    xs, ys = zip(*pts, strict=True)
    ax.plot(xs, ys, ".", markersize=4, alpha=0.35, color=color)
    span = default_span(len(ys))
    ax.plot(xs, ema(ys, span), "-", color=color, label=f"{label} (EMA, span {span:g})" if span > 1 else label)


def _points(rows: list[dict], split: str, metric: str) -> list[tuple[float, float]]:
    return [(r["step"], r[metric]) for r in rows if r.get("split") == split and r.get(metric) is not None]


def _legend(ax, drawn: dict[str, list[str]]) -> None:
    """The panel's legend; its entries go into ``drawn`` under the panel's title (for the caller)."""
    handles, labels = ax.get_legend_handles_labels()
    if labels:
        ax.legend(handles, labels, fontsize=7)
    drawn[ax.get_title()] = labels


def plot_stage(
    workdir: str, path: str, title: str, metrics: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """A small figure of one stage's training curves (one panel per metric; default: an RL run's policy and
    value loss, else its loss): train rows faint with their EMA, validation rows as markers. Returns each
    panel's title and legend entries; {} (and writes nothing) when the run logged none of the metrics."""
    rows = read_metrics(workdir)
    if metrics is None:
        metrics = ("policy_loss", "value_loss") if any("policy_loss" in r for r in rows) else ("loss",)
    metrics = [m for m in metrics if _points(rows, "train", m) or _points(rows, "eval", m)]
    if not metrics:
        return {}
    plt, drawn = _pyplot(), {}
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 2.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        train = _points(rows, "train", metric)
        if train:
            _smoothed(ax, train, "train", "tab:blue")
        held = _points(rows, "eval", metric)
        if held:
            ax.plot(*zip(*held, strict=True), "o", color="tab:orange", label="validation")
        ax.set_title(f"{title}: {TITLES.get(metric, metric)}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        _legend(ax, drawn)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def plot_rollouts(
    workdir: str,
    path: str,
    metrics: Sequence[str] = ("reward", "kl", "gold_reward"),
    *,
    baselines: dict[str, tuple[str, float]] | None = None,
    marks: dict[str, dict[str, tuple[float, float, float | None]]] | None = None,
) -> dict[str, list[str]]:
    """One panel per rollout metric of an RL run: each rollout's value faint, their EMA bold (rollouts are
    noisy: a trend hides in the raw points), a horizontal reference line per panel (``baselines``: {metric:
    (label, value)}, e.g. the SFT model's held-out gold reward), held-out numbers as points with error bars
    (``marks``: {metric: {label: (step, value, standard error or None)}}, e.g. the final policy and its EMA),
    and the run's own evaluations of the same quantity (its 'eval/<name>' rows, ``HELD_OUT``) as markers.
    Returns each panel's title and legend entries."""
    rows = read_metrics(workdir)
    evals = sorted({r["split"] for r in rows if str(r.get("split", "")).startswith("eval/")})
    plt, drawn = _pyplot(), {}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        pts = _points(rows, "rollout", metric)
        if pts:
            _smoothed(ax, pts, "per rollout", "tab:blue")
        for i, split in enumerate(evals):
            held = _points(rows, split, HELD_OUT.get(metric, metric))
            if held:
                ax.plot(*zip(*held, strict=True), "s", color=f"C{(i + 3) % 10}", label=split[len("eval/") :])
        if metric in (baselines or {}):
            label, value = baselines[metric]
            ax.axhline(value, linestyle="--", color="tab:green", label=label)
        shown = (marks or {}).get(metric, {})
        for i, (label, (x, y, se)) in enumerate(shown.items()):
            nudge = (i - (len(shown) - 1) / 2) * 0.02 * max(x, 1)  # side by side, not on top of each other
            ax.errorbar(
                [x + nudge],
                [y],
                yerr=None if se is None else [se],
                fmt="o",
                capsize=3,
                color=f"C{i + 1}",
                label=label,
            )
        ax.set_title(TITLES.get(metric, metric))
        ax.set_xlabel("step")
        _legend(ax, drawn)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


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
    (their points are not joined by lines). ``xlog_above`` > 0: the x axis is logarithmic above that value
    and linear below it (symlog), for grids like 0, 0.01, 0.1, 1."""
    plt = _pyplot()
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
