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

import math
from collections.abc import Mapping

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
