"""Aggregate ``results.json`` files into ``runs.csv``, ``summary.md`` and metric-vs-budget plots.

    python -m adarank.report DIR... [--out OUT_DIR] [--metric value|best_value] [--reference adalora]

``summary.md`` holds (a) mean ± sample std per (task, method, budget); (b) a GLUE-style
average per (method, budget) over the tasks every (method, budget) has; (c) paired
differences over shared seeds, reference method minus every other method at the same
(task, budget), with a two-sided paired t-test. Runs without a budget (full fine-tuning)
are their own row and are paired with every budget. Needs numpy and scipy, not pandas.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from adarank.atomic import atomic_write_text
from adarank.plots import metric_vs_budget

COLUMNS = ("task", "method", "budget", "seed", "metric", "value", "best_value",
           "trainable_params", "steps", "seconds")
REQUIRED = ("task", "method", "seed", "value")
METHOD_ORDER = ("full", "lora", "rslora", "adalora", "peft_lora", "peft_adalora")
METRIC_DOC = {
    "value": "final official-dev value",
    "best_value": "official-dev value at the step with the best carved-validation metric",
}

Config = tuple[str, int | None]  # (method, budget)
Groups = dict[tuple[str, str, int | None], dict[int, float]]  # (task, method, budget) -> seed -> value


class ReportError(Exception):
    """A problem with the command line's inputs, reported in one line."""


# ---------------------------------------------------------------- loading


def find_results(dirs: Sequence[str]) -> list[Path]:
    """All ``results.json`` under ``dirs``, each file once, in path order."""
    found: dict[Path, Path] = {}
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise ReportError(f"{d}: no such directory")
        hits = [root] if root.name == "results.json" else sorted(root.rglob("results.json"))
        hits = [h for h in hits if h.is_file()]
        if not hits:
            raise ReportError(f"{d}: no results.json found")
        for h in hits:
            found.setdefault(h.resolve(), h)  # overlapping DIRs must not fake duplicates
    return sorted(found.values(), key=str)


def load_row(path: Path) -> dict[str, Any]:
    """The report's columns from one ``results.json`` (plus its ``path``)."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in REQUIRED if data.get(k) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    row = {c: data.get(c) for c in COLUMNS}
    row["budget"] = None if row["budget"] is None else int(row["budget"])
    row["seed"] = int(row["seed"])
    row["path"] = str(path)
    return row


def _method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _budget_key(budget: int | None) -> int:
    return -1 if budget is None else budget


def _row_key(row: dict[str, Any]) -> tuple:
    return (row["task"], _method_key(row["method"]), _budget_key(row["budget"]), row["seed"])


def load_rows(paths: Iterable[Path], warn: Callable[[str], None]) -> list[dict[str, Any]]:
    """Rows sorted by task, method, budget, seed; unreadable files and duplicates are warned about."""
    rows: dict[tuple, dict[str, Any]] = {}
    for path in paths:
        try:
            row = load_row(path)
        except (OSError, ValueError, TypeError) as e:
            warn(f"warning: skipping {path}: {e}")
            continue
        key = (row["task"], row["method"], row["budget"], row["seed"])
        if key in rows:
            warn(f"warning: duplicate run task={key[0]} method={key[1]} budget={key[2]} seed={key[3]}:"
                 f" keeping {path}, dropping {rows[key]['path']}")
        rows[key] = row  # paths come sorted, so the last one by path order wins
    return sorted(rows.values(), key=_row_key)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` with ``COLUMNS`` as ``runs.csv`` (None as an empty cell)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow(["" if r[c] is None else r[c] for c in COLUMNS])
    atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------- statistics


def group_values(rows: Iterable[dict[str, Any]], column: str) -> Groups:
    """(task, method, budget) -> {seed: value of ``column``}, skipping runs that lack it."""
    groups: Groups = defaultdict(dict)
    for r in rows:
        if r[column] is not None:
            groups[(r["task"], r["method"], r["budget"])][r["seed"]] = float(r[column])
    return dict(groups)


def mean_std(values: Iterable[float]) -> tuple[float, float | None]:
    """Mean and sample std (None for a single value)."""
    v = np.asarray(list(values), dtype=float)
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def task_average(groups: Groups) -> tuple[list[str], dict[Config, float]]:
    """GLUE-style score: per (method, budget), the mean over tasks of per-task means.

    Only tasks that every (method, budget) has are used, so the averages are comparable.
    Returns those tasks and the averages.
    """
    tasks_of: dict[Config, set[str]] = defaultdict(set)
    for task, method, budget in groups:
        tasks_of[(method, budget)].add(task)
    common = sorted(set.intersection(*tasks_of.values())) if tasks_of else []
    averages = {
        cfg: float(np.mean([mean_std(groups[(t, *cfg)].values())[0] for t in common]))
        for cfg in tasks_of
    } if common else {}
    return common, averages


def paired_test(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided paired t-test p-value; None when undefined (n < 2 or constant differences)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size < 2 or np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):
        return None
    from scipy.stats import ttest_rel  # lazy: scipy.stats takes a while to import

    return float(ttest_rel(a, b).pvalue)


def paired_differences(groups: Groups, reference: str = "adalora") -> list[dict[str, Any]]:
    """Per (task, budget): reference minus every other method over shared seeds.

    Budget-less runs (full fine-tuning) join every budget's comparisons, after the others.
    If the reference is missing at a (task, budget), every pair is compared instead: the
    later method in ``METHOD_ORDER`` minus the earlier, and each method minus full.
    """
    out = []
    for task in sorted({t for t, _, _ in groups}):
        unbudgeted = sorted((m for t, m, b in groups if t == task and b is None), key=_method_key)
        for budget in sorted({b for t, _, b in groups if t == task and b is not None}):
            here = sorted((m for t, m, b in groups if t == task and b == budget), key=_method_key)
            if reference in here:
                pairs = [(reference, m, budget) for m in here if m != reference]
                pairs += [(reference, m, None) for m in unbudgeted]
            else:
                pairs = [(later, earlier, budget) for earlier, later in combinations(here, 2)]
                pairs += [(m, u, None) for m in here for u in unbudgeted]
            for ma, mb, budget_b in pairs:
                va, vb = groups[(task, ma, budget)], groups[(task, mb, budget_b)]
                seeds = sorted(set(va) & set(vb))
                if not seeds:
                    continue
                a, b = [va[s] for s in seeds], [vb[s] for s in seeds]
                out.append({"task": task, "budget": budget, "a": ma, "b": mb, "n": len(seeds),
                            "mean_diff": float(np.mean(np.subtract(a, b))), "p": paired_test(a, b)})
    return out


# ---------------------------------------------------------------- markdown


def _num(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _budget(b: int | None) -> str:
    return "-" if b is None else str(b)


def _table(header: Sequence[str], body: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return lines


def render_summary(rows: Sequence[dict[str, Any]], column: str, reference: str,
                   plots: dict[str, Path | None]) -> str:
    """The text of ``summary.md``."""
    groups = group_values(rows, column)
    metric_of: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        metric_of[r["task"]].add(str(r["metric"]))
    metric = {t: "/".join(sorted(m)) for t, m in metric_of.items()}

    lines = ["# adarank results", "",
             f"{len(rows)} runs. Column `{column}`: {METRIC_DOC[column]}. "
             "Std is the sample std over seeds (n/a for one seed).", "",
             "## Mean ± std per task, method and budget", ""]
    body = []
    for (task, method, budget), by_seed in sorted(
            groups.items(), key=lambda kv: (kv[0][0], _method_key(kv[0][1]), _budget_key(kv[0][2]))):
        mean, std = mean_std(by_seed.values())
        body.append([task, metric[task], method, _budget(budget), len(by_seed),
                     f"{_num(mean)} ± {_num(std)}"])
    lines += _table(["task", "metric", "method", "budget", "n", "mean ± std"], body)

    lines += ["", "## Average over tasks", ""]
    common, averages = task_average(groups)
    all_tasks = sorted({t for t, _, _ in groups})
    if not averages:
        lines.append("No task is shared by every (method, budget); no average.")
    else:
        left_out = sorted(set(all_tasks) - set(common))
        lines.append(f"Mean of per-task means over {len(common)} task(s) that every (method, budget) has: "
                     f"{', '.join(common)}." + (f" Left out: {', '.join(left_out)}." if left_out else ""))
        lines.append("")
        body = [[m, _budget(b), _num(v)] for (m, b), v in
                sorted(averages.items(), key=lambda kv: (_method_key(kv[0][0]), _budget_key(kv[0][1])))]
        lines += _table(["method", "budget", "average"], body)

    lines += ["", f"## Paired differences over seeds (reference: {reference})", "",
              "Mean of A - B over the seeds both have; p from a two-sided paired t-test "
              "(n/a when n < 2 or the differences are constant). "
              "Runs without a budget are paired with every budget.", ""]
    pairs = paired_differences(groups, reference)
    if pairs:
        body = [[p["task"], _budget(p["budget"]), f"{p['a']} - {p['b']}", p["n"],
                 _num(p["mean_diff"], "+.4f"), _num(p["p"], ".3g")] for p in pairs]
        lines += _table(["task", "budget", "A - B", "n pairs", "mean diff", "p"], body)
    else:
        lines.append("No two methods share a task, budget and seed.")

    shown = [(t, p) for t, p in plots.items() if p is not None]
    if shown:
        lines += ["", "## Plots", ""] + [f"![{t}]({p.name})" for t, p in shown]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad inputs)."""
    parser = argparse.ArgumentParser(prog="python -m adarank.report", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="folders searched for results.json")
    parser.add_argument("--out", help="output folder (default: the first DIR)")
    parser.add_argument("--metric", choices=tuple(METRIC_DOC), default="value",
                        help="which results.json value to summarise")
    parser.add_argument("--reference", default="adalora", help="method the others are paired against")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its message; hand back the code
        return e.code if isinstance(e.code, int) else 2

    def warn(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        rows = load_rows(find_results(args.dirs), warn)
        if not rows:
            raise ReportError(f"{', '.join(args.dirs)}: no readable results.json")
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    first = Path(args.dirs[0])
    out = Path(args.out) if args.out else (first.parent if first.is_file() else first)
    write_csv(out / "runs.csv", rows)
    plots = {task: metric_vs_budget(rows, out / f"metric_vs_budget_{_safe(task)}.png", task, args.metric)
             for task in sorted({r["task"] for r in rows})}
    atomic_write_text(out / "summary.md", render_summary(rows, args.metric, args.reference, plots))
    print(f"wrote {out / 'runs.csv'}, {out / 'summary.md'} and {sum(p is not None for p in plots.values())} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
