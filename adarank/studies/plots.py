"""PNG plots across runs: the budget schedules of several seeds, a metric against the budget, and the
adapter-norm blow-up study's curves.

A run's own plots (its rank heatmap and budget schedule) are in ``adarank.runner.plots``, with the figure
plumbing these share (`new_figure`, `save_png`: ``matplotlib.figure.Figure`` directly, no pyplot).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adarank.atomic import PathLike
from adarank.runner.plots import new_figure, save_png


def budget_curves(curves: Mapping[str, Sequence[Sequence[float]]], path: PathLike, title: str = "") -> Path | None:
    """Write several runs' budget schedules on one axis; None if every curve is empty.

    ``curves`` maps a label (e.g. "seed 0") to ``[[step, budget], ...]``. The schedule is a function
    of the step count alone, so when every curve is the same one line is drawn; otherwise each
    run gets a thin labelled line.
    """
    curves = {label: [tuple(p) for p in c] for label, c in curves.items() if c}
    if not curves:
        return None
    distinct = list(dict.fromkeys(tuple(c) for c in curves.values()))
    fig = new_figure(6, 3.5)
    ax = fig.add_subplot()
    if len(distinct) == 1:
        steps, budgets = zip(*distinct[0])
        ax.plot(steps, budgets, drawstyle="steps-post", label=next(iter(curves)) if len(curves) == 1 else f"{len(curves)} runs, identical")
    else:
        for label, curve in curves.items():
            steps, budgets = zip(*curve)
            ax.plot(steps, budgets, drawstyle="steps-post", linewidth=0.8, alpha=0.7, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("budget (total rank)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return save_png(fig, path)


def _is_missing(x: Any) -> bool:
    # pandas turns a null budget into NaN, plain rows keep None.
    return x is None or (isinstance(x, float) and math.isnan(x))


def _as_rows(df_or_rows: Any) -> list[dict[str, Any]]:
    if hasattr(df_or_rows, "to_dict"):  # a pandas DataFrame, without importing pandas
        return df_or_rows.to_dict("records")
    return [dict(r) for r in df_or_rows]


def _mean_std(values: Iterable[float]) -> tuple[float, float]:
    v = np.asarray(list(values), dtype=float)
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else 0.0)


def metric_vs_budget(df_or_rows: Any, path: PathLike, task: str, column: str = "value") -> Path | None:
    """Plot mean ± sample std of ``column`` against budget, one line per method, for one task.

    Accepts a DataFrame or rows with ``task, method, budget`` and ``column`` (and optionally
    ``metric`` for the axis label). Runs without a budget (full fine-tuning) become a
    horizontal reference line. Returns None when the task has no rows.
    """
    rows = [r for r in _as_rows(df_or_rows) if r["task"] == task and not _is_missing(r[column])]
    if not rows:
        return None
    groups: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        budget = None if _is_missing(r["budget"]) else int(r["budget"])
        groups[r["method"]][budget].append(float(r[column]))

    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    budgets_seen: set[int] = set()
    for method, by_budget in groups.items():
        if None in by_budget:
            mean, std = _mean_std(by_budget.pop(None))
            line = ax.axhline(mean, linestyle="--", color="gray", label=f"{method} (no budget)")
            ax.axhspan(mean - std, mean + std, color=line.get_color(), alpha=0.15)
        if not by_budget:
            continue
        xs = sorted(by_budget)
        budgets_seen.update(xs)
        stats = [_mean_std(by_budget[b]) for b in xs]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats],
                    marker="o", capsize=3, label=method)
    if budgets_seen:
        ax.set_xticks(sorted(budgets_seen))
    metric = rows[0].get("metric") or column
    ax.set_xlabel("budget (average rank)")
    ax.set_ylabel(f"{metric} ({column})" if column != "value" else metric)
    ax.set_title(task)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def _none_last(x: Any) -> tuple[bool, float]:
    return (x is None, 0.0 if x is None else float(x))


def norm_blowup(lines: Sequence[Mapping[str, Any]], path: PathLike, title: str = "") -> Path | None:
    """Write adapter norms and the training loss against the step, one line per run group; None if no curve.

    Each line is ``{"label", "ratio", "lr", "diverged", "curves"}`` with ``curves`` mapping ``norm/max``,
    ``norm/mean`` and ``train/loss`` to ``[[step, value], ...]``. The panels (norm/max and norm/mean on a
    log axis, then train/loss) share the step axis; a panel with no data is left out. Colour follows
    α/r and line style the learning rate, so a 2 x 2 grid of runs reads at a glance. A diverged group's
    line ends in an x, at its last logged step.
    """
    specs = [("norm/max", True), ("norm/mean", True), ("train/loss", False)]
    panels = [(k, log) for k, log in specs if any(line["curves"].get(k) for line in lines)]
    if not panels:
        return None
    ratios = sorted({line.get("ratio") for line in lines}, key=_none_last)
    lrs = sorted({line.get("lr") for line in lines}, key=_none_last)
    colour = {r: f"C{i % 10}" for i, r in enumerate(ratios)}
    style = {lr: ["-", "--", ":", "-."][i % 4] for i, lr in enumerate(lrs)}

    fig = new_figure(7, 0.8 + 2.4 * len(panels))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    handles: dict[str, Any] = {}
    for ax, (key, log) in zip(axes, panels):
        for line in lines:
            # a log axis cannot show 0 (an adapter before its first step) or a negative value
            pts = [(s, v) for s, v in line["curves"].get(key) or [] if math.isfinite(v) and (v > 0 or not log)]
            if not pts:
                continue
            xs, ys = zip(*pts)
            c, ls = colour[line.get("ratio")], style[line.get("lr")]
            label = line["label"] + (" (diverged)" if line.get("diverged") else "")
            (h,) = ax.plot(xs, ys, color=c, linestyle=ls, linewidth=1.4)
            handles.setdefault(label, h)
            if line.get("diverged"):
                ax.plot([xs[-1]], [ys[-1]], marker="x", markersize=9, color=c, linestyle="none")
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[0].legend(list(handles.values()), list(handles), fontsize=8)
    if title:
        axes[0].set_title(title)
    return save_png(fig, path)


def allocation_movement(movements: Mapping[str, Mapping[str, Any]], path: PathLike, title: str = "") -> Path | None:
    """Write how each run's allocation moved over the schedule; None when no run has masking events.

    ``movements`` maps a label (e.g. "seed 0") to ``adarank.studies.stability.movement``'s dict. Top: Spearman's
    ρ of each event's per-module ranks with the final allocation's; bottom: the L1 change from the previous event.
    """
    movements = {label: m for label, m in movements.items() if m["steps"]}
    if not movements:
        return None
    fig = new_figure(6, 5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for label, m in movements.items():
        pts = [(s, r) for s, r in zip(m["steps"], m["rho_to_final"]) if r is not None]
        if pts:
            top.plot(*zip(*pts), marker=".", linewidth=1, alpha=0.8, label=label)
        l1 = [(s, x) for s, x in zip(m["steps"], m["l1"]) if x is not None]
        if l1:
            bottom.plot(*zip(*l1), marker=".", linewidth=1, alpha=0.8, label=label)
    top.set_ylabel("ρ with the final ranks")
    top.set_ylim(-1.05, 1.05)
    bottom.set_ylabel("L1 change from the previous event")
    bottom.set_xlabel("step (masking events)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(fontsize=7)
    if title:
        top.set_title(title)
    return save_png(fig, path)


def agreement_vs_chance(entries: Sequence[Mapping[str, Any]], path: PathLike, title: str = "") -> Path | None:
    """Write the seeds' agreement beside its chance level, one row per group; None without entries.

    Each entry is ``{"label", "spearman", "jaccard", "chance"}`` (``group_stability``'s fields; ``chance`` as
    ``chance_levels`` returns it, or None). Left: ρ between seeds' final ranks; right: Jaccard of kept triplets.
    A dot is the observed value, a bar the permuted-histogram chance mean with a whisker to its 95th
    percentile, and (right) a cross the given-ranks chance level.
    """
    entries = [e for e in entries if e.get("spearman") is not None or e.get("jaccard") is not None]
    if not entries:
        return None
    fig = new_figure(8, 1.6 + 0.35 * len(entries))
    axes = fig.subplots(1, 2, sharey=True)
    ys = np.arange(len(entries))[::-1]
    for ax, key in zip(axes, ("spearman", "jaccard")):
        labelled: set[str] = set()

        def label(text: str) -> str | None:  # each kind of mark once in the legend
            return None if text in labelled or labelled.add(text) else text

        for y, e in zip(ys, entries):
            chance = e.get("chance") or {}
            mean, q95 = chance.get(key), chance.get(f"{key}_q95")
            if mean is not None:
                ax.barh(y, mean, color="lightgray", height=0.6, label=label("chance (permuted histogram)"))
                if q95 is not None:
                    ax.plot([mean, q95], [y, y], color="gray", linewidth=1)
            if key == "jaccard" and chance.get("jaccard_given_ranks") is not None:
                ax.plot(chance["jaccard_given_ranks"], y, "x", color="C1", label=label("chance (given ranks)"))
            if e.get(key) is not None:
                ax.plot(e[key], y, "o", color="C0", label=label("seeds"))
        ax.set_xlabel("Spearman ρ of final ranks between seeds" if key == "spearman" else "Jaccard of kept triplets")
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(ys, [e["label"] for e in entries], fontsize=8)
    handles = {}
    for ax in axes:  # one legend for both panels, below them, where it hides no mark
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=3, fontsize=7)
    if title:
        fig.suptitle(title)
    return save_png(fig, path)
