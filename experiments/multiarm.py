"""Pieces the multi-arm studies in experiments/ share (allocation_controls, allocators): the learning-rate choice
of a selection group, the driver's options, job overrides and loop around jobqueue.run_queue with its
sweep_state.json, and the tables' reading of that state and row handling (the chosen rate only, rows per (task, budget) and arm, markdown).

A study's plan is any object with `initial()` and `ready()` (lists of jobqueue.Job, ready ones handed out as
their dependencies finish) and `state()` (what sweep_state.json records, with "chosen": "task/arm/budget" -> lr).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adarank.atomic import atomic_write_json
from adarank.studies.report import choose_lr as report_choose_lr
from adarank.studies.report import load_row, lower_is_better


def ended(out: Path) -> bool:
    """Whether the run in folder `out` has ended (results.json or diverged.json)."""
    return (out / "results.json").exists() or (out / "diverged.json").exists()


def choose_lr(runs: dict[float, Path]) -> float | None:
    """The learning rate of a selection group (lr -> run folder), by the report's rule (best mean
    carved-validation metric, ties to the smaller); None until every run has ended or when none has a
    validation metric."""
    if not all(ended(out) for out in runs.values()):
        return None
    rows = {lr: load_row(out / "results.json") for lr, out in runs.items() if (out / "results.json").exists()}
    ok = {lr: r["val_value"] for lr, r in rows.items() if r["val_value"] is not None}
    if not ok:
        return None
    return report_choose_lr(ok, lower_is_better(next(iter(rows.values()))["metric"]))


def add_queue_args(ap: argparse.ArgumentParser) -> None:
    """The driver options of jobqueue.run_queue, and the Hydra overrides passed to every job (after --)."""
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--per-gpu", type=int, default=8)
    ap.add_argument("--launch-until", type=float, default=float("inf"), help="seconds after which no job starts")
    ap.add_argument("--kill-at", type=float, default=float("inf"), help="seconds after which running jobs are stopped")
    ap.add_argument("extra", nargs="*", help="more Hydra overrides for every job (after --)")


def job_overrides(root: Path, extra: list[str]) -> list[str]:
    """What every job of a study under `root` runs with: resumable, no W&B, one data cache for the study."""
    return ["resume=true", "wandb.mode=disabled", "train.progress=false", f"data.cache_dir={root / 'cache'}", *extra]


def read_sweep(root: Path) -> dict[str, Any] | None:
    """root/sweep_state.json ({} before the first job ends); None, with the error printed, when root has no
    final runs (the driver has not run)."""
    if not (root / "final").is_dir():
        print(f"error: {root / 'final'}: no such directory (run the driver first)", file=sys.stderr)
        return None
    path = root / "sweep_state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run_plan(plan: Any, root: Path, gpus: int, per_gpu: int, launch_until: float, kill_at: float,
             queue_runner: Callable) -> tuple[list[dict], list]:
    """Run (or continue) `plan`'s jobs through `queue_runner` (jobqueue.run_queue's contract), recording the
    plan's state and every job's outcome in root/sweep_state.json after each job (the chosen rates of earlier
    calls are kept). Returns (every job's log entry, this call's and earlier ones; the jobs not started)."""
    root.mkdir(parents=True, exist_ok=True)
    state_path = root / "sweep_state.json"
    old = json.loads(state_path.read_text()) if state_path.exists() else {}
    log: list[dict] = old.get("jobs", [])

    def save() -> None:
        atomic_write_json(state_path, {**plan.state(), "chosen": old.get("chosen", {}) | plan.state()["chosen"],
                                       "jobs": log})

    def on_end(job, what: str, seconds: float) -> list:
        log.append({"stage": job.tags["stage"], "dir": str(job.out.relative_to(root)), "outcome": what,
                    "seconds": seconds})
        new = plan.ready()
        save()
        return new

    left = queue_runner(plan.initial(), gpus, per_gpu, launch_until, kill_at, on_end)
    save()
    return log, left


def at_chosen_lr(rows: list[dict[str, Any]], chosen: dict[str, float], warn=print) -> list[dict[str, Any]]:
    """The rows at their group's chosen learning rate (sweep_state.json's ``chosen``, keyed "task/arm/budget");
    a group without a recorded choice keeps its rows. Rows at another rate (a grid changed between calls) are
    dropped with a warning, so no cell mixes rates."""
    keep = []
    for r in rows:
        lr = chosen.get(f"{r['task']}/{r['arm']}/{r['budget']}")
        if lr is None or r["lr"] == lr:
            keep.append(r)
        else:
            warn(f"warning: {r['path']}: lr {r['lr']:g} is not its group's chosen {lr:g}; left out")
    return keep


def by_cell(rows: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, dict[int, dict[str, Any]]]]:
    """(task, budget) -> arm -> seed -> row."""
    out: dict = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        out[(r["task"], r["budget"])][r["arm"]][r["seed"]] = r
    return out


def num(x: float | None, spec: str = ".4f") -> str:
    """`x` formatted, n/a for None."""
    return "n/a" if x is None else format(x, spec)


def md_table(header: list[str], body: list[list[Any]]) -> list[str]:
    """The lines of a markdown table."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
