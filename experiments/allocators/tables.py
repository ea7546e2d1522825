"""The allocators comparison's tables, from the runs the driver made.

    python experiments/allocators/tables.py multirun/allocators --out results/allocators

Writes OUT/tables.md:
- the learning rate each (task, arm, budget) took on the carved validation split (sweep_state.json), marked
  when it is at an end of the arm's grid (the optimum may lie outside it);
- mean ± sample std of the final dev value per (task, budget, arm), with the adapters' final trainable
  parameters and mean rank (the budgets the arms actually ended on);
- paired tests over seeds (the report's two-sided paired t-test, ``adarank.studies.report.paired_test``) of
  every arm against lora and against adalora per (task, budget), with Holm's adjustment over each table, and a
  tally per arm of where it is ahead, behind, and significantly so (the losses as well as the wins);
- where each arm puts its rank: the share of its total final rank per layer and per matrix type (results.json
  final_ranks, mean over seeds), and how many modules it left at rank 0; LoRA is uniform by construction;
- the wall time per training step: from the timing stage (one run per arm alone on a GPU, under train.speed
  eager and auto) and, for reference only, from the final runs, which shared their GPUs with other jobs.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent), str(HERE)]

import numpy as np  # noqa: E402
from plan import ARMS, arm_of  # noqa: E402
from multiarm import at_chosen_lr, by_cell, md_table, num, read_sweep  # noqa: E402

from adarank.atomic import atomic_write_text  # noqa: E402
from adarank.runner.plots import NO_LAYER, layer_key, parse_module_name  # noqa: E402
from adarank.studies.report import TYPE_ORDER, load_row, lower_is_better, matrix_type, mean_std, paired_test  # noqa: E402
from adarank.studies.runs import find_results, read_record  # noqa: E402

REFERENCES = ("lora", "adalora")
ALPHA = 0.05


def load_runs(root: Path, stage: str = "final") -> list[dict[str, Any]]:
    """The report's row of every run under root/stage, with its ``arm``, its step time and its speed mode."""
    rows = []
    for path in find_results([str(root / stage)]):
        rec = read_record(path)
        row = load_row(path)
        sps = rec.get("steps_per_second")
        row |= {"arm": arm_of(rec["config"]), "ms_per_step": 1000.0 / sps if sps else None,
                "outside_steps_s": (rec["seconds"] - rec["train_seconds"]) if rec.get("train_seconds") is not None else None,
                "speed": (rec.get("speed") or {}).get("mode"), "params_final": rec.get("trainable_params_final")}
        rows.append(row)
    return rows


def holm(ps: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of the p-values that are not None (the Nones stay None)."""
    idx = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])
    out: list[float | None] = [None] * len(ps)
    running = 0.0
    for k, i in enumerate(idx):
        running = max(running, min(1.0, (len(idx) - k) * ps[i]))
        out[i] = running
    return out


def paired_vs(cells: dict, reference: str, column: str = "value") -> list[dict[str, Any]]:
    """Every other arm minus `reference` in every (task, budget) where both have shared seeds, Holm-adjusted
    over the whole list; ``ahead``: the mean difference is in the metric's better direction."""
    out = []
    for (task, budget), arms in sorted(cells.items()):
        if reference not in arms:
            continue
        for arm in (a for a in ARMS if a in arms and a != reference):
            seeds = sorted(set(arms[arm]) & set(arms[reference]))
            if not seeds:
                continue
            va, vb = [arms[arm][s][column] for s in seeds], [arms[reference][s][column] for s in seeds]
            diff = float(np.mean(np.subtract(va, vb)))
            lower = lower_is_better(arms[arm][seeds[0]]["metric"])
            out.append({"task": task, "budget": budget, "a": arm, "b": reference, "n": len(seeds), "mean_diff": diff,
                        "ahead": diff < 0 if lower else diff > 0, "p": paired_test(va, vb)})
    for p, adj in zip(out, holm([p["p"] for p in out])):
        p["p_holm"] = adj
    return out


def tally(pairs: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per arm: cells compared, ahead / behind on the mean, and significant wins / losses (Holm p < ALPHA)."""
    out: dict = defaultdict(lambda: {"cells": 0, "ahead": 0, "behind": 0, "wins": 0, "losses": 0})
    for p in pairs:
        t = out[p["a"]]
        t["cells"] += 1
        t["ahead" if p["ahead"] else "behind"] += p["mean_diff"] != 0
        if p["p_holm"] is not None and p["p_holm"] < ALPHA:
            t["wins" if p["ahead"] else "losses"] += 1
    return dict(out)


def rank_shares(ranks: dict[str, float]) -> dict[str, Any]:
    """One run's final ranks: the share of the total rank per layer and per matrix type, the mean rank per
    module and how many modules are at rank 0 (of those results.json lists)."""
    total = float(sum(ranks.values()))
    layer: dict[str, float] = defaultdict(float)
    kind: dict[str, float] = defaultdict(float)
    for name, r in ranks.items():
        layer[parse_module_name(name)[0]] += r
        kind[matrix_type(name)] += r
    share = (lambda d: {k: v / total for k, v in d.items()}) if total else (lambda d: {k: 0.0 for k in d})
    return {"layer": share(layer), "type": share(kind), "mean_rank": total / len(ranks),
            "zero": sum(1 for r in ranks.values() if r == 0)}


def mean_shares(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """`rank_shares` averaged over the runs that report final ranks (None when none does)."""
    each = [rank_shares(r["final_ranks"]) for r in runs if r["final_ranks"]]
    if not each:
        return None

    def avg(part: str) -> dict[str, float]:
        keys = dict.fromkeys(k for e in each for k in e[part])
        return {k: float(np.mean([e[part].get(k, 0.0) for e in each])) for k in keys}

    return {"n": len(each), "layer": avg("layer"), "type": avg("type"),
            "mean_rank": float(np.mean([e["mean_rank"] for e in each])), "zero": float(np.mean([e["zero"] for e in each]))}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _lr_section(chosen: dict[str, float], grids: dict[str, list[float]]) -> list[str]:
    body = []
    for g, lr in sorted(chosen.items()):
        grid = grids.get(g.split("/")[1])
        edge = " (grid edge)" if grid and lr in (min(grid), max(grid)) and len(grid) > 1 else ""
        body.append([g, f"{lr:g}{edge}", " ".join(f"{x:g}" for x in grid) if grid else "n/a"])
    return md_table(["task/arm/budget", "lr", "grid"], body)


def _means_section(cells: dict, metric: dict[str, str]) -> list[str]:
    body = []
    for (task, budget), arms in sorted(cells.items()):
        for arm in (a for a in ARMS if a in arms):
            runs = list(arms[arm].values())
            mean, std = mean_std([r["value"] for r in runs])
            params = [r["params_final"] for r in runs if r["params_final"] is not None]
            ranks = [sum(r["final_ranks"].values()) / len(r["final_ranks"]) for r in runs if r["final_ranks"]]
            body.append([task, metric[task], budget, arm, len(runs), f"{num(mean)} ± {num(std)}",
                         f"{np.mean(params):,.0f}" if params else "n/a",
                         num(float(np.mean(ranks)), ".2f") if ranks else (f"{budget} (fixed)" if arm == "lora" else "n/a")])
    return md_table(["task", "metric", "budget", "arm", "n", "mean ± std", "trainable params (final)", "mean rank"], body)


def _paired_section(pairs: list[dict[str, Any]]) -> list[str]:
    return md_table(["task", "budget", "A - B", "n", "mean diff", "p", "p (Holm)"],
                    [[p["task"], p["budget"], f"{p['a']} - {p['b']}", p["n"], num(p["mean_diff"], "+.4f"),
                      num(p["p"], ".3g"), num(p["p_holm"], ".3g")] for p in pairs])


def _tally_section(pairs_by_ref: dict[str, list[dict[str, Any]]]) -> list[str]:
    body = []
    for ref, pairs in pairs_by_ref.items():
        for arm, t in sorted(tally(pairs).items(), key=lambda kv: list(ARMS).index(kv[0])):
            body.append([arm, ref, t["cells"], t["ahead"], t["behind"], t["wins"], t["losses"]])
    return md_table(["arm", "against", "cells", "ahead (mean)", "behind (mean)", "significant wins",
                     "significant losses"], body)


def _rank_section(cells: dict) -> list[str]:
    groups = [((task, budget, arm), s) for (task, budget), arms in sorted(cells.items()) for arm in ARMS
              if arm in arms and (s := mean_shares(list(arms[arm].values()))) is not None]
    layers = sorted({la for _, s in groups for la in s["layer"]}, key=layer_key)
    types = sorted({t for _, s in groups for t in s["type"]},
                   key=lambda t: (TYPE_ORDER.index(t), "") if t in TYPE_ORDER else (len(TYPE_ORDER), t))
    header = ["task", "budget", "arm", "n", "mean rank", "modules at 0",
              *[f"L{la}" if la != NO_LAYER else "no layer" for la in layers], *types]
    body = [[task, budget, arm, s["n"], num(s["mean_rank"], ".2f"), num(s["zero"], ".1f"),
             *[_pct(s["layer"].get(la, 0.0)) for la in layers], *[_pct(s["type"].get(t, 0.0)) for t in types]]
            for (task, budget, arm), s in groups]
    return md_table(header, body)


def _timing_rows(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """(speed stage, task, budget) -> arm -> mean ms/step, as table rows with the overhead against lora."""
    cell: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["ms_per_step"] is not None:
            cell[(r["stage"], r["task"], r["budget"])][r["arm"]].append(r)
    body = []
    for (stage, task, budget), arms in sorted(cell.items()):
        base = np.mean([r["ms_per_step"] for r in arms["lora"]]) if arms.get("lora") else None
        for arm in (a for a in ARMS if a in arms):
            ms = [r["ms_per_step"] for r in arms[arm]]
            mean, std = mean_std(ms)
            outside = [r["outside_steps_s"] for r in arms[arm] if r["outside_steps_s"] is not None]
            modes = "/".join(sorted({str(r["speed"]) for r in arms[arm]}))
            body.append([stage, task, budget, arm, modes, len(ms), f"{num(mean, '.1f')} ± {num(std, '.1f')}",
                         f"{100 * (mean / base - 1):+.0f}%" if base else "n/a",
                         num(float(np.mean(outside)), ".1f") if outside else "n/a"])
    return body


def _timing_section(timing: list[dict[str, Any]], final: list[dict[str, Any]]) -> list[str]:
    header = ["stage", "task", "budget", "arm", "mode", "n", "ms/step", "vs lora", "s outside steps"]
    lines = ["Alone on a GPU (the timing stage: one run per arm, seed 0). `timing_eager`: every arm the same "
             "kernels, so the difference to lora is the allocation's and the parameterisation's cost; "
             "`timing_auto`: the mode train.speed picks (column mode). ms/step: training steps only, after the "
             "first (no evaluation, checkpoints, graph captures); s outside steps: the run's wall time around them "
             "(model and data loading, evaluation, EVA's data-driven init).", ""]
    lines += md_table(header, _timing_rows(timing)) if timing else ["(no timing runs yet: `--stages timing`)"]
    lines += ["", "The final runs, for reference only: they shared each GPU with up to per-gpu − 1 other jobs, so "
              "their step times measure the neighbours as much as the method.", ""]
    return lines + md_table(header, _timing_rows(final))


def render(rows: list[dict[str, Any]], timing: list[dict[str, Any]], state: dict) -> str:
    """The text of tables.md."""
    cells = by_cell(rows)
    metric = {r["task"]: r["metric"] for r in rows}
    pairs = {ref: paired_vs(cells, ref) for ref in REFERENCES}
    lines = ["# Allocators (issue 20): tables", "",
             f"{len(rows)} final runs (`python experiments/allocators/tables.py`). Value: the final official-dev "
             "metric; std: sample std over seeds.", "", "## Learning rates (carved validation split)", ""]
    lines += _lr_section(state.get("chosen", {}), state.get("grids", {}))
    lines += ["", "## Mean ± std", ""] + _means_section(cells, metric)
    for ref in REFERENCES:
        lines += ["", f"## Paired differences against {ref}", "",
                  f"Mean of A - {ref} over the seeds both have; p from a two-sided paired t-test (n/a when n < 2 or "
                  f"the differences are constant), Holm-adjusted over this table's {len(pairs[ref])} tests.", ""]
        lines += _paired_section(pairs[ref])
    lines += ["", "## Wins and losses", "",
              f"Per arm and reference, over the (task, budget) cells: ahead / behind on the mean difference, and "
              f"significant wins / losses (Holm-adjusted p < {ALPHA}).", ""] + _tally_section(pairs)
    lines += ["", "## Where each arm puts its rank", "",
              "Share of the arm's total final rank (%) per layer and per matrix type, mean over seeds "
              "(results.json final_ranks); mean rank: total over the modules listed; modules at 0: left unadapted. "
              "lora is uniform by construction (every layer and type 16.7%) and reports no final ranks.", ""]
    lines += _rank_section(cells)
    lines += ["", "## Wall time per step", ""] + _timing_section(timing, rows)
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", help="the driver's --root")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    root, out = Path(args.root), Path(args.out)
    state = read_sweep(root)
    if state is None:
        return 2
    warn = lambda m: print(m, file=sys.stderr)  # noqa: E731
    chosen = state.get("chosen", {})
    rows = [r | {"stage": "final"} for r in at_chosen_lr(load_runs(root), chosen, warn)]
    timing = [r | {"stage": d.name} for d in sorted(root.glob("timing_*")) for r in at_chosen_lr(load_runs(root, d.name), chosen, warn)]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tables.md", render(rows, timing, state))
    print(f"wrote {out / 'tables.md'} from {len(rows)} final runs and {len(timing)} timing runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
