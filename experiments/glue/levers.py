"""The levers the literature names for AdaLoRA, and the rule that turns lever runs into a new default.

Issue 5: if adalora does not beat LoRA, try a longer budgeting phase, initial rank 2x instead of 1.5x, beta1/
beta2, the orthogonal weight, rsLoRA scaling for the SVD adapter and the ablation scores, choosing only on the
validation split carved from train. Each lever is a set of Hydra overrides on top of the GLUE experiment config,
run at the learning rate chosen for adalora in that (task, budget) cell.

The rule (`candidate`, then `confirmed`), written before any lever run was seen:
  1. Screen, seed 100: a lever's gain in a cell is its validation metric minus the default's (the selection run at
     the chosen learning rate, same seed). A lever is a candidate when its mean gain over all cells is > 0, it
     gains in at least two thirds of the cells, and no run of it diverged. The candidate with the largest mean
     gain goes on.
  2. Confirm, seed 101: the candidate and the default run once more in every cell. The candidate is adopted when
     its mean gain on this second seed is > 0 too. Ten levers screened on one seed would otherwise pick noise.
An adopted lever becomes the new default: the final runs of adalora are repeated with it (and those of PEFT's
AdaLoRA when PEFT has the same knob, so both keep one schedule and one set of hyperparameters).

A bias to know when reading a screen: the default's value in a cell is that of the learning rate chosen out of
seven on the same seed, so it carries the winner of that choice's luck, and the levers (run once at that rate)
do not. The screen therefore leans towards the default; the confirmation on a fresh seed has no such lean.

`Levers` runs the study inside the GLUE sweep (experiments/glue/sweep.py); `render` and
`python experiments/glue/levers.py ROOT --out FILE` write its table from the run folders.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for _p in (str(ROOT), str(Path(__file__).resolve().parent)):  # the package, and layout.py beside this file
    if _p not in sys.path:
        sys.path.insert(0, _p)

from layout import group_dir, run_name

from adarank.studies.report import load_row, lower_is_better

#: lever name -> overrides. The GLUE configs' default: budgeting from 10% to 70% of training (init_frac 0.1,
#: final_frac 0.3), init_ratio 1.5, beta1 = beta2 = 0.85, orth_weight 0.1, scale α/r_init, uncertainty scores.
LEVERS: dict[str, list[str]] = {
    "budget_to_90pct": ["method.final_frac=0.1"],  # a longer budgeting phase: 10% -> 90% of training
    "budget_to_50pct": ["method.final_frac=0.5"],  # about half of training budgeting (AdaLoRA#19): 10% -> 50%
    "init_2x": ["method.init_ratio=2.0"],
    "beta_0.7": ["method.beta1=0.7", "method.beta2=0.7"],
    "beta_0.95": ["method.beta1=0.95", "method.beta2=0.95"],
    "orth_0": ["method.orth_weight=0"],
    "orth_0.5": ["method.orth_weight=0.5"],
    "rslora_scale": ["method.rslora=true"],
    "score_sensitivity": ["method.score=sensitivity"],
    "score_magnitude": ["method.score=magnitude"],
}

#: Levers that PEFT's AdaLoRA also has (schedule, initial rank, EMAs, orthogonal weight). PEFT ignores
#: use_rslora for AdaLoRA and has only the uncertainty score.
PEFT_HAS = {"budget_to_90pct", "budget_to_50pct", "init_2x", "beta_0.7", "beta_0.95", "orth_0", "orth_0.5"}

MIN_WIN_FRACTION = 2 / 3


def run_value(out: Path) -> tuple[float | None, bool]:
    """(validation metric at the best step, lower is better) of the run in `out`; (None, False) when it has not
    finished (diverged, stopped or never run)."""
    path = out / "results.json"
    if not path.exists():
        return None, False
    row = load_row(path)
    return row["val_value"], lower_is_better(row["metric"])


def gains(lever: Mapping[tuple, float | None], default: Mapping[tuple, float | None],
          lower: bool | Mapping[tuple, bool] = False) -> list[float | None]:
    """Per cell of `default`, lever minus default, sign flipped where lower is better (`lower`: one flag, or one
    per cell); None where either has no value."""
    out = []
    for cell, d in default.items():
        v = lever.get(cell)
        low = lower.get(cell, False) if isinstance(lower, Mapping) else lower
        ok = v is not None and d is not None and math.isfinite(v) and math.isfinite(d)
        out.append(((d - v) if low else (v - d)) if ok else None)
    return out


def summarize(g: list[float | None]) -> dict:
    """Mean gain, wins and cell count of one lever; `complete` is False when a cell has no value (diverged)."""
    vals = [x for x in g if x is not None]
    return {"mean_gain": sum(vals) / len(vals) if vals else None, "wins": sum(x > 0 for x in vals),
            "cells": len(g), "complete": len(vals) == len(g) and bool(g)}


def candidate(screen: Mapping[str, dict]) -> str | None:
    """The lever that goes on to confirmation (rule 1), or None."""
    ok = {name: s for name, s in screen.items()
          if s["complete"] and s["mean_gain"] > 0 and s["wins"] >= MIN_WIN_FRACTION * s["cells"]}
    if not ok:
        return None
    return max(sorted(ok), key=lambda n: ok[n]["mean_gain"])


def confirmed(summary: dict) -> bool:
    """Rule 2: the candidate's mean gain on the second seed is > 0, with no cell missing."""
    return bool(summary["complete"]) and summary["mean_gain"] > 0


# ---------------------------------------------------------------- the study inside the sweep

#: make(stage, task, method, budget, lr, seed, lever, folder) -> a job (experiments/glue/sweep.py's make_job)
MakeJob = Callable[..., "object"]


class Levers:
    """The study over the adalora cells (task, "adalora", budget): screen (one seed) under <root>/levers/,
    confirm (a second seed), then the final runs with an adopted lever under <root>/final_<lever>/. Decisions
    are recomputed from the run folders, so a resumed sweep with the same arguments reaches the same ones."""

    def __init__(self, make: MakeJob, cells: list[tuple], screen_seed: int, confirm_seed: int,
                 final_seeds: Mapping[int, tuple[int, ...]]):
        self.make, self.cells, self.final_seeds = make, cells, final_seeds
        self.seeds = (screen_seed, confirm_seed)
        self.screen: dict[tuple, list] = {}
        self.confirm: list | None = None
        self.finals: list | None = None
        self.state: dict = {"rule": "levers.py", "screen": {}, "candidate": None, "confirm": None, "adopted": None}

    def _job(self, cell: tuple, lr: float, seed: int, lever: str | None):
        task, method, budget = cell
        return self.make("levers", task, method, budget, lr, seed, lever, lever or "default")

    @staticmethod
    def _values(jobs: Mapping[tuple, object]) -> tuple[dict, dict]:
        runs = {c: run_value(j.out) for c, j in jobs.items()}
        return {c: v for c, (v, _) in runs.items()}, {c: low for c, (_, low) in runs.items()}

    def step(self, chosen: Mapping[tuple, float], defaults: Mapping[tuple, object]) -> list:
        """New jobs, given the chosen learning rate of every group decided so far and the default's selection
        run (at the chosen rate, the screen's seed) of every adalora cell decided so far."""
        new = []
        for cell in self.cells:
            if cell in chosen and cell not in self.screen:
                self.screen[cell] = [self._job(cell, chosen[cell], self.seeds[0], lv) for lv in LEVERS]
                new += self.screen[cell]
        if len(self.screen) < len(self.cells) or not all(j.done() for js in self.screen.values() for j in js):
            return new
        if self.confirm is None:
            default, lower = self._values({c: defaults[c] for c in self.cells})
            for lv in LEVERS:
                own, _ = self._values({c: next(j for j in self.screen[c] if j.tags["lever"] == lv) for c in self.cells})
                self.state["screen"][lv] = summarize(gains(own, default, lower))
            cand = candidate(self.state["screen"])
            self.state["candidate"] = cand
            self.confirm = [] if cand is None else [self._job(c, chosen[c], self.seeds[1], lv)
                                                    for c in self.cells for lv in (cand, None)]
            new += self.confirm
        if self.finals is not None or not all(j.done() for j in self.confirm):
            return new
        cand = self.state["candidate"]
        if cand is not None and self.state["adopted"] is None and self.state["confirm"] is None:
            own, lower = self._values({j.tags["group"]: j for j in self.confirm if j.tags["lever"] == cand})
            default, _ = self._values({j.tags["group"]: j for j in self.confirm if j.tags["lever"] is None})
            self.state["confirm"] = summarize(gains(own, {c: default.get(c) for c in self.cells}, lower))
            self.state["adopted"] = cand if confirmed(self.state["confirm"]) else None
        lever = self.state["adopted"]
        groups = [] if lever is None else [
            (task, m, budget) for task, _, budget in self.cells
            for m in ["adalora"] + (["peft_adalora"] if lever in PEFT_HAS else [])]
        if any(g not in chosen for g in groups):
            return new  # PEFT's rate of a cell is not chosen yet: its finals come with a later call of step
        self.finals = [self.make(f"final_{lever}", task, m, budget, chosen[(task, m, budget)], s, lever, None)
                       for task, m, budget in groups for s in self.final_seeds[budget]]
        return new + self.finals


# ---------------------------------------------------------------- the lever table of a finished sweep


def _cell(out: Path) -> tuple[float | None, str]:
    """A run's validation value and how to show a missing one: "div." (diverged) or "–" (not run / unfinished)."""
    value, _ = run_value(out)
    return value, "div." if (out / "diverged.json").exists() else "–"


def render(root: Path) -> str:
    """Markdown table of the lever screen of the sweep in `root`: per (task, budget) the default's validation
    metric, every lever's gain over it (in points), the mean gain and wins, and the rule's decisions, all
    recomputed from the run folders (sweep_state.json supplies the chosen learning rates and decisions)."""
    state = json.loads((root / "sweep_state.json").read_text())
    chosen = {tuple(k.split("/")): v["lr"] for k, v in state["chosen"].items()}
    cells = sorted((t, int(b)) for (t, m, b) in chosen if m == "adalora")
    seed = state["select_seed"]

    def run(stage: str, task: str, b: int, *lever: str) -> Path:
        return group_dir(root, stage, task, "adalora", b) / Path(*lever) / run_name(chosen[(task, "adalora", str(b))], seed)

    default = {c: _cell(run("select", *c)) for c in cells}
    metrics = sorted({f"{t}: {load_row(run('select', t, b) / 'results.json')['metric']}" for t, b in cells
                      if (run("select", t, b) / "results.json").exists()})
    lower = {c: run_value(run("select", *c))[1] for c in cells}
    head = " | ".join(f"{t} r{b}" for t, b in cells)
    lines = ["# Lever study: adalora's validation metric against its default, per (task, budget)", "",
             (f"Seed {seed}, each cell at the learning rate chosen for adalora there; the validation split carved "
             f"from train, at the best step ({', '.join(metrics)}). Gains are lever − default, in points (×100; "
             "sign flipped for metrics where lower is better); div.: diverged; –: no finished run. The rule "
             "(experiments/glue/levers.py) was fixed before the runs: a candidate needs a mean gain > 0, gains in "
             "at least two thirds of the cells and no diverged run; the best candidate is then rerun with a "
             "second seed against the default. The default's value is the best of seven learning rates on this "
             "seed, which leans the screen towards the default."), "",
             f"| setting | overrides | {head} | mean gain | wins |", "|---|---|" + "---|" * len(cells) + "---|---|",
             "| default (value) | – | " + " | ".join(f"{v:.4f}" if v is not None else miss for v, miss in default.values())
             + " | | |"]
    for lever, overrides in LEVERS.items():
        own = {c: _cell(run("levers", *c, lever)) for c in cells}
        g = gains({c: v for c, (v, _) in own.items()}, {c: v for c, (v, _) in default.items()}, lower)
        s = summarize(g)
        cols = " | ".join(own[c][1] if x is None else f"{100 * x:+.2f}" for c, x in zip(cells, g))
        mean = "–" if s["mean_gain"] is None else f"{100 * s['mean_gain']:+.2f}"
        lines.append(f"| {lever} | `{' '.join(overrides)}` | {cols} | {mean} | {s['wins']}/{s['cells']} |")
    lv = state.get("levers") or {}
    confirm = lv.get("confirm") or {}
    second = ("" if not confirm else "Second seed: no complete comparison. " if confirm.get("mean_gain") is None
              else f"Second seed: mean gain {100 * confirm['mean_gain']:+.2f} points. ")
    verdict = (f"Adopted: **{lv['adopted']}**; the final runs with it are under final_{lv['adopted']}/."
               if lv.get("adopted") else "Adopted: **none**; the default stays as it is.")
    lines += ["", f"Candidate by the rule: **{lv.get('candidate') or 'none'}**. {second}{verdict}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    from adarank.atomic import atomic_write_text

    ap = argparse.ArgumentParser(description="Write the lever table of a finished GLUE sweep.")
    ap.add_argument("root", type=Path, help="the sweep's --root (holds sweep_state.json)")
    ap.add_argument("--out", type=Path, required=True, help="markdown file to write")
    args = ap.parse_args(argv)
    if not (args.root / "sweep_state.json").exists():
        print(f"levers: {args.root / 'sweep_state.json'} not found", file=sys.stderr)
        return 2
    atomic_write_text(args.out, render(args.root))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
