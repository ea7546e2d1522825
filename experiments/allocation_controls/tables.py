"""The allocation-controls study's tables and plot, from the final runs the driver made.

    python experiments/allocation_controls/tables.py multirun/allocation_controls --out results/allocation_controls

Writes OUT/tables.md and OUT/stability.png:
- the learning rate each (task, arm, budget) took on the carved validation split (from sweep_state.json);
- mean ± sample std of the final dev value per (task, budget, arm);
- paired tests over seeds (the report's two-sided paired t-test, ``adarank.studies.report.paired_test``) for the
  three questions: allocation (learned vs shuffled, vs uniform, vs reversed layers, shuffled vs uniform, all
  LoRA), parameterisation (svd vs LoRA at the same rank) and pruning (adalora vs svd), with adalora vs LoRA
  on its own pattern beside them;
- the stability of adalora's allocation over the seeds (``adarank.studies.stability``) per (task, budget), and in
  stability.png the learned patterns' agreement against the shuffled chance level (each seed's ranks permuted
  over the modules: what the lora_shuffled arm trains on).
Runs are labelled by arm from their config (plan.arm_of), so plain LoRA and the pattern arms never mix.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent), str(HERE)]

import numpy as np  # noqa: E402
from plan import ARMS, SOURCE, arm_of  # noqa: E402
from multiarm import at_chosen_lr, by_cell, read_sweep  # noqa: E402
from multiarm import md_table as _table  # noqa: E402
from multiarm import num as _num  # noqa: E402

from adarank.atomic import atomic_write_text  # noqa: E402
from adarank.studies.plots import agreement_vs_chance  # noqa: E402
from adarank.studies.report import load_row, mean_std, paired_test  # noqa: E402
from adarank.studies.runs import find_results, read_record  # noqa: E402
from adarank.studies.stability import group_stability  # noqa: E402

#: (question, A, B): the paired differences A - B over shared seeds, per (task, budget)
COMPARISONS = (
    ("allocation", "lora_learned", "lora_shuffled"),
    ("allocation", "lora_learned", "lora_uniform"),
    ("allocation", "lora_learned", "lora_reversed"),
    ("allocation", "lora_shuffled", "lora_uniform"),
    ("parameterisation", "svd", "lora"),
    ("pruning", "adalora", "svd"),
    ("all of it, same final ranks", "adalora", "lora_learned"),
)


def load_runs(root: Path) -> list[dict[str, Any]]:
    """The report's row of every final run under root/final, with its ``arm`` and its results.json's course."""
    rows = []
    for path in find_results([str(root / "final")]):
        row = load_row(path)
        row["arm"] = arm_of(read_record(path)["config"])
        rows.append(row)
    return rows


def paired(cells: dict, column: str = "value") -> list[dict[str, Any]]:
    """Every comparison of COMPARISONS in every (task, budget) where both arms have shared seeds."""
    out = []
    for (task, budget), arms in sorted(cells.items()):
        for question, a, b in COMPARISONS:
            seeds = sorted(set(arms.get(a, {})) & set(arms.get(b, {})))
            if not seeds:
                continue
            va, vb = [arms[a][s][column] for s in seeds], [arms[b][s][column] for s in seeds]
            out.append({"task": task, "budget": budget, "question": question, "a": a, "b": b, "n": len(seeds),
                        "mean_diff": float(np.mean(np.subtract(va, vb))), "p": paired_test(va, vb)})
    return out


def stability_entries(cells: dict, draws: int = 200) -> list[dict[str, Any]]:
    """adalora's `group_stability` per (task, budget), labelled for the plot."""
    return [{"label": f"{task} r={budget}", "task": task, "budget": budget,
             **group_stability(list(arms[SOURCE].values()), draws)}
            for (task, budget), arms in sorted(cells.items()) if SOURCE in arms]


def render(rows: list[dict[str, Any]], chosen: dict[str, float], stability: list[dict[str, Any]]) -> str:
    """The text of tables.md."""
    cells = by_cell(rows)
    metric = {r["task"]: r["metric"] for r in rows}
    lines = ["# Allocation controls (issue 19): tables", "",
             f"{len(rows)} final runs (`python experiments/allocation_controls/tables.py`). Value: the final "
             "official-dev metric; std: sample std over seeds.", "", "## Learning rates (carved validation split)", ""]
    lines += _table(["task/arm/budget", "lr"], [[g, f"{lr:g}"] for g, lr in sorted(chosen.items())])
    lines += ["", "## Mean ± std", ""]
    body = []
    for (task, budget), arms in sorted(cells.items()):
        for arm in (a for a in ARMS if a in arms):
            mean, std = mean_std([r["value"] for r in arms[arm].values()])
            body.append([task, metric[task], budget, arm, len(arms[arm]), f"{_num(mean)} ± {_num(std)}"])
    lines += _table(["task", "metric", "budget", "arm", "n", "mean ± std"], body)
    lines += ["", "## Paired differences over seeds", "",
              "Mean of A - B over the seeds both have; p from a two-sided paired t-test (n/a when n < 2 or the "
              "differences are constant).", ""]
    lines += _table(["task", "budget", "question", "A - B", "n", "mean diff", "p"],
                    [[p["task"], p["budget"], p["question"], f"{p['a']} - {p['b']}", p["n"], _num(p["mean_diff"], "+.4f"),
                      _num(p["p"], ".3g")] for p in paired(cells)])
    lines += ["", "## Stability of adalora's allocation over seeds", "",
              "ρ: Spearman between seeds' final per-module ranks (mean over pairs); Jaccard: kept triplets per module "
              "(mean over pairs and modules); chance: each seed's ranks permuted over the modules (the shuffled "
              "control's patterns), kept triplets uniform within a module: mean / 95th percentile, one-sided p; "
              "Jaccard given ranks: chance with each seed's own ranks. Movement: mean over seeds of the L1 change between "
              "masking events beyond what the shrinking budget forces, and the step from which ρ with the final "
              "ranks stays >= 0.9 (`adarank/studies/stability.py`).", ""]
    body = []
    for e in stability:
        c, ms = e["chance"] or {}, e["movements"]
        realloc = float(np.mean([m["reallocation"] for m in ms])) if ms else None
        settle = [m["settle_step"] for m in ms if m["settle_step"] is not None]
        body.append([e["task"], e["budget"], e["n"], _num(e["spearman"], ".2f"),
                     f"{_num(c.get('spearman'), '.2f')} / {_num(c.get('spearman_q95'), '.2f')}", _num(c.get("spearman_p"), ".3g"),
                     _num(e["jaccard"], ".2f"), f"{_num(c.get('jaccard'), '.2f')} / {_num(c.get('jaccard_q95'), '.2f')}",
                     _num(c.get("jaccard_p"), ".3g"), _num(c.get("jaccard_given_ranks"), ".2f"), _num(realloc, ".1f"),
                     _num(float(np.mean(settle)) if settle else None, ".0f")])
    lines += _table(["task", "budget", "n", "ρ", "chance ρ", "p", "Jaccard", "chance", "p", "Jaccard given ranks",
                     "reallocation L1", "settled from step"], body)
    return "\n".join(lines + ["", "![learned patterns against the shuffled chance level](stability.png)", ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", help="the driver's --root")
    ap.add_argument("--out", required=True)
    ap.add_argument("--draws", type=int, default=200, help="random allocations per chance level")
    args = ap.parse_args(argv)
    root, out = Path(args.root), Path(args.out)
    state = read_sweep(root)
    if state is None:
        return 2
    rows = at_chosen_lr(load_runs(root), state.get("chosen", {}), lambda m: print(m, file=sys.stderr))
    cells = by_cell(rows)
    stability = stability_entries(cells, args.draws)
    out.mkdir(parents=True, exist_ok=True)
    agreement_vs_chance(stability, out / "stability.png", title="adalora's final allocations: seeds against the shuffled chance level")
    atomic_write_text(out / "tables.md", render(rows, state.get("chosen", {}), stability))
    print(f"wrote {out / 'tables.md'} and {out / 'stability.png'} from {len(rows)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
