"""The rank / alpha recipe: where quality stops improving with LoRA rank, and which α/r is best there.

    python -m adarank.studies.rank_study DIR... --out OUT --metric val/ppl --lower-is-better [--tol 0.01]

The study sweeps the LoRA rank r over a doubling sequence (4, 8, 16, ...) under two scalings: plain LoRA
with α = r (scale α/r = 1 at every rank) and rsLoRA with a fixed α (scale α/√r). The *plateau rank* is
where doubling r stops paying (`plateau_rank`); at that rank an α sweep picks the best α/r
(`best_alpha_ratio`). AdaLoRA runs whose target average rank equals r (so the same final parameter
budget as LoRA at rank r, up to one λ per triplet) are drawn as markers on the rank plot.

Runs are grouped into *series*: ``lora α/r=<ratio>`` (LoRA at a fixed α/r, i.e. a fixed scale) and
``rslora α=<alpha>`` (rsLoRA at a fixed α); AdaLoRA runs go to ``adalora``. Seeds are averaged. A run's α
and learning rate are the ones it applied (results.json's ``alpha`` and ``lr``; in older files, derived from
its config by `adarank.studies.runs`).

The failure mode (α/r = 4 at a high learning rate blows up the adapter norm) is `adarank.studies.norm_study`,
also reachable as `python -m adarank.studies.rank_study --norms DIR... --out OUT`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adarank.atomic import atomic_write_json, atomic_write_text
from adarank.runner.plots import new_figure, save_png
from adarank.studies import norm_study
from adarank.studies.errors import StudyError
from adarank.studies.runs import (
    FULL,
    applied_alpha,
    applied_lr,
    find_results,
    read_record,
)

ADALORA = "adalora"


# ---------------------------------------------------------------- the rules


def _means(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Average the values that share an x (seeds), sorted by x."""
    by: dict[float, list[float]] = defaultdict(list)
    for x, v in points:
        by[x].append(float(v))
    return sorted((x, float(np.mean(vs))) for x, vs in by.items())


def relative_gain(before: float, after: float, higher_is_better: bool) -> float:
    """Improvement from `before` to `after` as a fraction of |before| (negative when it got worse)."""
    gain = after - before if higher_is_better else before - after
    return gain / max(abs(before), 1e-12)


def plateau_rank(points: Sequence[tuple[int, float]], higher_is_better: bool, tol: float = 0.01) -> int:
    """The plateau rank of a rank sweep.

    `points` are (r, value); values at the same r (seeds) are averaged, and the ranks sorted, r_0 < r_1 < ...
    (normally a doubling sequence; a gap counts as one step). Step k, from r_k to r_{k+1}, gains
    g_k = relative_gain(v_k, v_{k+1}). The plateau rank is the smallest r_k such that every later step
    gains less than `tol`: g_j < tol for all j >= k. So a curve that keeps improving by at least `tol` at
    its last step has the largest rank as plateau (the sweep did not reach one), a temporary flat step
    followed by a real gain does not count as a plateau, and a single rank is its own plateau.
    """
    pts = _means(points)
    if not pts:
        raise ValueError("plateau_rank: no points")
    ranks = [int(r) for r, _ in pts]
    plateau = ranks[-1]
    for k in range(len(pts) - 2, -1, -1):  # walk back while the step after r_k is flat
        if relative_gain(pts[k][1], pts[k + 1][1], higher_is_better) >= tol:
            break
        plateau = ranks[k]
    return plateau


def best_alpha_ratio(points: Sequence[tuple[float, float]], higher_is_better: bool) -> float:
    """The α/r whose mean value (over seeds) is best; ties go to the smallest α/r."""
    pts = _means(points)
    if not pts:
        raise ValueError("best_alpha_ratio: no points")
    values = np.array([v for _, v in pts])
    i = int(np.argmax(values) if higher_is_better else np.argmin(values))  # first best = smallest ratio
    return float(pts[i][0])


# ---------------------------------------------------------------- records


def lookup(record: dict, key: str) -> Any:
    """`record[key]`, else `record["metrics"]["final"][key]`, else the dotted path `key` (None if absent)."""
    if key in record:
        return record[key]
    final = (record.get("metrics") or {}).get("final") or {}
    if key in final:
        return final[key]
    node: Any = record
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _number(value: Any) -> float | None:
    """`value` as a float when it is a finite int or float (not a bool), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def study_point(record: dict, metric: str) -> dict | None:
    """{series, method, r, alpha, ratio, scale, rslora, value, seed} of one results.json record (α: the one
    applied, `applied_alpha`; scale: α/r, or α/√r for rsLoRA); None without the metric, and None for full
    fine-tuning (see `reference`)."""
    value = _number(lookup(record, metric))
    method = record.get("method")
    if value is None or method == FULL:
        return None
    cfg = (record.get("config") or {}).get("method") or {}
    r, alpha = cfg.get("r"), applied_alpha(record)
    if method is None or r is None or alpha is None:
        raise ValueError("needs method, config.method.r and config.method.alpha")
    r = int(r)
    rslora = bool(cfg.get("rslora")) or method == "rslora"
    if method in (ADALORA, "peft_adalora"):
        series = ADALORA
    elif rslora:
        series = f"rslora α={alpha:g}"
    else:
        series = f"lora α/r={alpha / r:g}"
    return {"series": series, "method": method, "r": r, "alpha": alpha, "ratio": alpha / r,
            "scale": alpha / math.sqrt(r) if rslora else alpha / r,
            "rslora": rslora, "value": value, "seed": record.get("seed")}


def reference(records: Iterable[dict], metric: str) -> list[tuple[float, float | None]]:
    """(metric, learning rate) of the full fine-tuning runs among `records`: the reference line, not a rank
    series. The rate is the one that applied (`applied_lr`)."""
    out = []
    for record in records:
        value = _number(lookup(record, metric)) if record.get("method") == FULL else None
        if value is not None:
            out.append((value, applied_lr(record)))
    return out


def collect(records: Iterable[dict], metric: str, warn: Callable[[str], None] = lambda m: None) -> list[dict]:
    """Study points of `records`, skipping (with a warning) those without the metric and, silently, full
    fine-tuning (see `reference`); all one task."""
    points, tasks = [], set()
    for i, rec in enumerate(records):
        where = rec.get("path", f"record {i}")
        if rec.get("method") == FULL:
            tasks.add(rec.get("task"))
            continue
        try:
            p = study_point(rec, metric)
        except ValueError as e:
            warn(f"warning: skipping {where}: {e}")
            continue
        if p is None:
            warn(f"warning: skipping {where}: no numeric {metric!r}")
            continue
        tasks.add(rec.get("task"))
        points.append(p)
    if len(tasks) > 1:
        raise StudyError(f"the runs span several tasks ({', '.join(sorted(map(str, tasks)))}); study one at a time")
    return points


def _sweeps(points: Sequence[dict]) -> list[str]:
    """Series run at two or more ranks (the rank sweeps), plus adalora, in display order."""
    ranks: dict[str, set[int]] = defaultdict(set)
    for p in points:
        ranks[p["series"]].add(p["r"])
    return sorted((s for s, rs in ranks.items() if len(rs) >= 2 or s == ADALORA), key=_series_order)


def _series_order(name: str) -> tuple:
    kind = 0 if name.startswith("lora") else 1 if name.startswith("rslora") else 2
    return (kind, float(name.split("=")[1]) if "=" in name else 0.0)


# ---------------------------------------------------------------- the report


def analyse(points: Sequence[dict], higher_is_better: bool, tol: float = 0.01,
            alpha_rank: int | None = None) -> dict[str, Any]:
    """Plateau rank of every series with at least two ranks, and best α/r of LoRA and rsLoRA at `alpha_rank`.

    `alpha_rank` defaults to the plateau rank of ``lora α/r=1`` (α = r), else of the series with the most
    ranks, else the most common rank.
    """
    by_series: dict[str, list[dict]] = defaultdict(list)
    for p in points:
        by_series[p["series"]].append(p)
    plateaus = {s: plateau_rank([(p["r"], p["value"]) for p in ps], higher_is_better, tol)
                for s, ps in sorted(by_series.items(), key=lambda kv: _series_order(kv[0]))
                if s != ADALORA and len({p["r"] for p in ps}) >= 2}
    # plateau_rank gives the top rank exactly when the last doubling still gained >= tol
    reached = {s: r < max(p["r"] for p in by_series[s]) for s, r in plateaus.items()}
    note = None
    if alpha_rank is None:
        if "lora α/r=1" in plateaus:
            alpha_rank = plateaus["lora α/r=1"]
        elif plateaus:
            alpha_rank = plateaus[max(plateaus, key=lambda s: len({p["r"] for p in by_series[s]}))]
        elif points:
            ranks = [p["r"] for p in points if p["series"] != ADALORA]
            alpha_rank = max(set(ranks), key=ranks.count) if ranks else None
        lora_ratios: dict[int, set[float]] = defaultdict(set)  # rank -> the α/r values LoRA ran at
        for p in points:
            if p["series"] != ADALORA and not p["rslora"]:
                lora_ratios[p["r"]].add(p["ratio"])
        swept = sorted(r for r, ratios in lora_ratios.items() if len(ratios) >= 2)  # ranks with an α sweep
        if alpha_rank is not None and swept and alpha_rank not in swept:
            below = [r for r in swept if r <= alpha_rank]
            fallback = below[-1] if below else swept[0]
            note = (f"no α sweep at r = {alpha_rank}; the largest rank below it with one, r = {fallback}, is used"
                    if below else f"no α sweep at r = {alpha_rank} or below; the smallest rank with one, r = {fallback}, is used")
            alpha_rank = fallback
        elif alpha_rank is not None and not swept:
            note = "these runs hold no α sweep"
    best = {}
    for kind in ("lora", "rslora"):
        at = [(p["ratio"], p["value"]) for p in points
              if p["r"] == alpha_rank and p["series"] != ADALORA and p["rslora"] == (kind == "rslora")]
        if len({x for x, _ in at}) >= 2:
            best[kind] = best_alpha_ratio(at, higher_is_better)
    return {"plateau_rank": plateaus, "plateau_reached": reached, "alpha_rank": alpha_rank,
            "alpha_rank_note": note, "best_alpha_ratio": best}


def _mean_std_n(values: Sequence[float]) -> str:
    v = np.asarray(values, dtype=float)
    if v.size == 1:
        return f"{v[0]:.4g}"
    return f"{v.mean():.4g} ± {v.std(ddof=1):.2g} (n={v.size})"


def render_markdown(points: Sequence[dict], result: dict, metric: str, higher_is_better: bool, tol: float,
                    full_finetuning: Sequence[tuple[float, float | None]] = ()) -> str:
    """The text of ``rank_study.md``: quality against rank per series, plateau ranks, the α/r sweep, and
    `full_finetuning` ((value, lr) of each full fine-tuning run) as a reference line."""
    direction = "higher" if higher_is_better else "lower"
    lines = [f"# Rank / alpha study: `{metric}` ({direction} is better)", "",
             f"Plateau rank: the smallest rank after which every doubling improves `{metric}` by less than "
             f"{tol:g} relative (mean over seeds).", ""]
    series = _sweeps(points)
    ranks = sorted({p["r"] for p in points if p["series"] in series})
    cells: dict[tuple[str, int], list[float]] = defaultdict(list)
    for p in points:
        cells[(p["series"], p["r"])].append(p["value"])
    lines += ["## Quality vs rank", "", "Series run at two or more ranks, and AdaLoRA at the same budget.", "",
              "| r | " + " | ".join(series) + " |", "|---" * (len(series) + 1) + "|"]
    for r in ranks:
        row = [_mean_std_n(cells[(s, r)]) if cells[(s, r)] else "" for s in series]
        lines.append(f"| {r} | " + " | ".join(row) + " |")
    if full_finetuning:
        lrs = ", ".join(sorted({"?" if lr is None else f"{lr:g}" for _, lr in full_finetuning}))
        mean = _mean_std_n([v for v, _ in full_finetuning])
        lines += ["", f"Full fine-tuning (reference, not a rank series; lr {lrs}): {mean}."]
    lines += ["", "| series | plateau rank | plateau reached |", "|---|---|---|"]
    reached = result.get("plateau_reached", {})
    lines += [f"| {s} | {r} | {'yes' if reached.get(s, True) else 'no: the last doubling still gained ≥ ' + format(tol, 'g')} |"
              for s, r in result["plateau_rank"].items()] or ["| (no series with two ranks) | | |"]
    r0 = result["alpha_rank"]
    lines += ["", f"## Quality vs α/r at r = {r0}", ""]
    if result.get("alpha_rank_note"):
        lines += [f"({result['alpha_rank_note']}.)", ""]
    at: dict[tuple[str, float], list[float]] = defaultdict(list)
    for p in points:
        if p["r"] == r0 and p["series"] != ADALORA:
            at[("rslora" if p["rslora"] else "lora", p["ratio"], p["scale"])].append(p["value"])
    if at:
        lines += ["| scaling | α/r | α | scale (LoRA α/r, rsLoRA α/√r) | value |", "|---|---|---|---|---|"]
        for (kind, ratio, scale), vs in sorted(at.items()):
            lines.append(f"| {kind} | {ratio:g} | {ratio * r0:g} | {scale:.3g} | {_mean_std_n(vs)} |")
    else:
        lines.append("No runs at this rank.")
    for kind, ratio in result["best_alpha_ratio"].items():
        lines.append(f"\nBest α/r for {kind} at r = {r0}: **{ratio:g}** (α = {ratio * r0:g}).")
    return "\n".join(lines) + "\n"


def plot_rank(points: Sequence[dict], result: dict, metric: str, path: Path,
              full_finetuning: Sequence[tuple[float, float | None]] = ()) -> Path | None:
    """Write ``quality_vs_rank.png``: each rank sweep (plateau rank circled), AdaLoRA as stars, full
    fine-tuning as a dashed line; None without points."""
    if not points:
        return None
    fig, ax = _figure()
    if full_finetuning:
        ax.axhline(float(np.mean([v for v, _ in full_finetuning])), color="grey", linestyle="--",
                   label="full fine-tuning")
    by: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for p in points:
        by[p["series"]].append((p["r"], p["value"]))
    for s in _sweeps(points):
        xs, ys = zip(*_means(by[s]))
        if s == ADALORA:
            ax.plot(xs, ys, linestyle="none", marker="*", markersize=12, color="k", label="adalora (same budget)")
        else:
            (line,) = ax.plot(xs, ys, marker="o", label=s)
            if s in result["plateau_rank"]:
                r = result["plateau_rank"][s]
                ax.plot([r], [dict(_means(by[s]))[r]], marker="o", markersize=14, fillstyle="none",
                        color=line.get_color())
    _log2_ticks(ax, sorted({p["r"] for p in points if p["series"] in _sweeps(points)}))
    ax.set_xlabel("rank r (AdaLoRA: target average rank)")
    ax.set_ylabel(metric)
    ax.set_title("quality vs rank (circled: plateau rank)")
    ax.legend()
    return save_png(fig, path)


def plot_alpha(points: Sequence[dict], result: dict, metric: str, path: Path) -> Path | None:
    """Write ``quality_vs_alpha.png``: quality against the adapter scale at the α-sweep rank; None without runs there."""
    r0 = result["alpha_rank"]
    by: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for p in points:
        if p["r"] == r0 and p["series"] != ADALORA:
            by["rslora" if p["rslora"] else "lora"].append((p["scale"], p["value"]))
    if not by:
        return None
    fig, ax = _figure()
    for kind, pts in sorted(by.items()):
        xs, ys = zip(*_means(pts))
        ax.plot(xs, ys, marker="o", label=kind)
    _log2_ticks(ax, sorted({x for pts in by.values() for x, _ in pts}))
    ax.set_xlabel("adapter scale (LoRA: α / r; rsLoRA: α / √r)")
    ax.set_ylabel(metric)
    ax.set_title(f"quality vs α/r at r = {r0}")
    ax.legend()
    return save_png(fig, path)


def _log2_ticks(ax: Any, values: Sequence[float]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.minorticks_off()


def _figure() -> tuple[Any, Any]:
    fig = new_figure(6, 4)
    return fig, fig.add_subplot()


def report(records: Iterable[dict], out_dir: str | Path, metric: str, higher_is_better: bool,
           tol: float = 0.01, alpha_rank: int | None = None,
           warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict[str, Any]:
    """Write ``rank_study.md``, ``rank_study.json``, ``quality_vs_rank.png`` and ``quality_vs_alpha.png``
    (when there are runs at the α-sweep rank) into `out_dir`; returns what rank_study.json holds:
    plateau_rank and plateau_reached (per series), alpha_rank and alpha_rank_note, best_alpha_ratio (per
    scaling), full_finetuning (value and lr of each full fine-tuning run), metric, higher_is_better, tol, runs,
    files.
    """
    records = list(records)
    points = collect(records, metric, warn)
    full_finetuning = reference(records, metric)
    if not points:
        raise StudyError(f"no run has a numeric {metric!r}")
    result = analyse(points, higher_is_better, tol, alpha_rank)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "rank_study.md",
                      render_markdown(points, result, metric, higher_is_better, tol, full_finetuning))
    files = [out / "rank_study.md", out / "rank_study.json",
             plot_rank(points, result, metric, out / "quality_vs_rank.png", full_finetuning),
             plot_alpha(points, result, metric, out / "quality_vs_alpha.png")]
    result |= {"metric": metric, "higher_is_better": higher_is_better, "tol": tol, "runs": len(points),
               "full_finetuning": [{"value": v, "lr": lr} for v, lr in full_finetuning],
               "files": [str(f) for f in files if f is not None]}
    atomic_write_json(out / "rank_study.json", result)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2, with one line on stderr, for bad inputs)."""
    parser = argparse.ArgumentParser(prog="python -m adarank.studies.rank_study", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="folders searched for results.json")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--metric", default="value",
                        help="a results.json key, a key of metrics.final (e.g. val/ppl), or a dotted path")
    parser.add_argument("--lower-is-better", action="store_true", help="for losses and perplexities")
    parser.add_argument("--tol", type=float, default=0.01, help="relative gain below which a doubling is flat")
    parser.add_argument("--alpha-rank", type=int, default=None, help="rank of the α sweep (default: plateau)")
    parser.add_argument("--norms", action="store_true",
                        help="the failure-mode study instead: adapter norm against step (results.json's train_log "
                             "and diverged.json), α/r = 4 against α/r = 1 at each lr")
    norm_study.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.norms:
        return norm_study.run(args.dirs, args.out, args.early, args.blowup_factor)
    try:
        records = []
        for path in find_results(args.dirs):
            try:
                records.append(read_record(path) | {"path": str(path)})
            except (OSError, ValueError) as e:
                print(f"warning: skipping {path}: {e}", file=sys.stderr)
            except TypeError:
                pass  # a JSON value that is not an object holds no run
        result = report(records, args.out, args.metric, not args.lower_is_better, args.tol, args.alpha_rank)
    except StudyError as e:
        print(f"rank_study: {e}", file=sys.stderr)
        return 2
    keys = ("plateau_rank", "plateau_reached", "alpha_rank", "best_alpha_ratio")
    print(json.dumps({k: result[k] for k in keys}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
