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
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

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


def gains(lever: Mapping[tuple, float | None], default: Mapping[tuple, float | None], lower: bool = False) -> list[float | None]:
    """Per cell, lever minus default (sign flipped when lower is better); None where either has no value."""
    out = []
    for cell, d in default.items():
        v = lever.get(cell)
        ok = v is not None and d is not None and math.isfinite(v) and math.isfinite(d)
        out.append(((d - v) if lower else (v - d)) if ok else None)
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


# ---------------------------------------------------------------- the lever table of a finished sweep


def render(root: Path) -> str:
    """Markdown table of the lever screen of the sweep in `root`: per (task, budget) the default's validation
    metric, every lever's gain over it (in points), the mean gain and wins, and the rule's decisions, all
    recomputed from the run folders (sweep_state.json supplies the chosen learning rates and decisions)."""
    from adarank.report import load_row

    state = json.loads((root / "sweep_state.json").read_text())
    chosen = {tuple(k.split("/")): v["lr"] for k, v in state["chosen"].items()}
    cells = sorted((t, int(b)) for (t, m, b) in chosen if m == "adalora")

    def val(path: Path) -> float | None:
        return load_row(path / "results.json")["val_value"] if (path / "results.json").exists() else None

    default = {}
    for task, b in cells:
        lr = chosen[(task, "adalora", str(b))]
        default[(task, b)] = val(root / "select" / task / f"adalora_r{b}" / f"lr{lr:g}_seed{state['select_seed']}")
    head = " | ".join(f"{t} r{b}" for t, b in cells)
    lines = ["# Lever study: adalora's validation metric against its default, per (task, budget)", "",
             "Seed " + str(state["select_seed"]) + ", each cell at the learning rate chosen for adalora there; the "
             "validation split carved from train, at the best step (SST-2 accuracy, CoLA Matthews, MRPC F1). "
             "Gains are lever − default, in points (×100). The rule (experiments/glue/levers.py) was fixed before "
             "the runs: a candidate needs a mean gain > 0, gains in at least two thirds of the cells and no "
             "diverged run; the best candidate is then rerun with a second seed against the default.", "",
             f"| setting | overrides | {head} | mean gain | wins |", "|---|---|" + "---|" * len(cells) + "---|---|",
             "| default (value) | – | " + " | ".join(f"{default[c]:.4f}" if default[c] is not None else "–" for c in cells)
             + " | | |"]
    for lever, overrides in LEVERS.items():
        own = {}
        for task, b in cells:
            lr = chosen[(task, "adalora", str(b))]
            own[(task, b)] = val(root / "levers" / task / f"adalora_r{b}" / lever / f"lr{lr:g}_seed{state['select_seed']}")
        g = gains(own, default)
        s = summarize(g)
        cols = " | ".join("div." if x is None else f"{100 * x:+.2f}" for x in g)
        mean = "–" if s["mean_gain"] is None else f"{100 * s['mean_gain']:+.2f}"
        lines.append(f"| {lever} | `{' '.join(overrides)}` | {cols} | {mean} | {s['wins']}/{s['cells']} |")
    lv = state.get("levers") or {}
    lines += ["", f"Candidate by the rule: **{lv.get('candidate') or 'none'}**. "
              + (f"Second seed: mean gain {100 * lv['confirm']['mean_gain']:+.2f} points. " if lv.get("confirm") else "")
              + f"Adopted: **{lv.get('adopted') or 'none'}**; the default stays as it is."
              if not lv.get("adopted") else f"Adopted: **{lv['adopted']}**."]
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
