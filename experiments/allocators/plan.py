"""The allocators comparison's grid (issue 20, part 5): which runs, in which order, at which learning rates.

Arms, each at budgets 2 and 8 on SST-2, CoLA and MRPC with MiniLM (conf/experiment/allocators_<task>):

| arm | run | its allocation | lr grid |
|---|---|---|---|
| adalora | `method=adalora` (r_init = 1.5 B, importance-pruned to B on the cubic schedule) | during training | SVD |
| eva | `method=eva` (ranks and A from an SVD of each target's inputs, N·B in all) | once, at the init | LoRA |
| sora | `method=sora` (λ as gates, proximal L1; ξ tuned to follow the same cubic budget, ends on B) | during training | SVD |
| increlora | `method=increlora` (rank 1 grown to B by importance over the same phase) | during training | SVD |
| lora | `method=lora` at r = B everywhere | none | LoRA |
| sora_fixed | `method=sora_fixed` (the paper's fixed ξ from step 1) — not by default: its final budget is wherever the gates land, so it is not at B | during training | SVD |

Learning-rate grids per family: the SVD adapters (P·diag(λ)·Q) took higher rates than LoRA in results/glue
(adalora 2e-3 / 5e-3, LoRA 5e-4, once 2e-3; adalora at 5e-4 was far behind, LoRA at 2e-3 collapsed on CoLA), so
each family gets four rates around its own optimum, overlapping at 1e-3 and 2e-3.

Protocol (the GLUE study's): stage `select` runs every arm at every rate of its grid with the selection seed (100,
not a reported seed); each (task, arm, budget) takes the rate with the best carved-validation metric (the
report's rule, experiments/multiarm.py; the official dev set plays no part); stage `final` runs it with seeds 0-4.
Stage `timing` (its own driver call, one job per GPU) runs each arm once more, seed 0 at its chosen rate, on the
timing tasks (MRPC), under each of the timing speeds: `eager` (every arm the same kernels, so the difference to
LoRA is the allocation's and the parameterisation's cost) and `auto` (what train.speed picks for the method: a
user's speed). Runs go to <root>/<stage>/<task>/<arm>_r<budget>/lr<lr>_seed<seed> (experiments/glue/layout.py),
the timing stage's to <root>/timing_<speed>/...
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent), str(HERE.parent / "glue")]

from jobqueue import Job  # noqa: E402
from layout import group_dir, run_name  # noqa: E402
from multiarm import choose_lr  # noqa: E402

TASKS = ("sst2", "cola", "mrpc")
BUDGETS = (2, 8)
SEEDS = (0, 1, 2, 3, 4)
SELECT_SEED = 100
TIMING_SEED = 0
TIMING_TASKS = ("mrpc",)  # the shortest task: its 520 steps cover the whole schedule in about a minute alone
TIMING_SPEEDS = ("eager", "auto")
LORA_LRS = (2e-4, 5e-4, 1e-3, 2e-3)
SVD_LRS = (1e-3, 2e-3, 5e-3, 1e-2)
COST = {"sst2": 3, "cola": 2, "mrpc": 1}  # rough relative run time: the longest tasks start first
STAGES = ("select", "final", "timing")


@dataclass(frozen=True)
class Arm:
    """One arm: its method, its learning-rate grid and the overrides its runs add to the experiment's."""

    method: str
    lrs: tuple[float, ...]
    """The selection grid (the arm's family: LORA_LRS or SVD_LRS)."""
    overrides: tuple[str, ...] = ()
    """Hydra overrides after method=..., e.g. a schedule the experiment file would otherwise set."""


ARMS = {
    "adalora": Arm("adalora", SVD_LRS),
    "eva": Arm("eva", LORA_LRS),
    "sora": Arm("sora", SVD_LRS),
    "increlora": Arm("increlora", SVD_LRS),
    "lora": Arm("lora", LORA_LRS),
    # its own schedule (conf/method/sora_fixed.yaml: the threshold from the first step to the last), not the
    # experiment's 0.1 / 0.3 of training, which is the budgeted arms' schedule
    "sora_fixed": Arm("sora_fixed", SVD_LRS, ("method.init_frac=0", "method.final_frac=0")),
}
DEFAULT_ARMS = ("adalora", "eva", "sora", "increlora", "lora")


def arm_of(config: dict) -> str:
    """The arm a finished run belongs to, from its results.json ``config`` (each arm is its own method)."""
    return config["method"]["name"]


def make_job(root: Path, stage: str, task: str, arm: str, budget: int, lr: float, seed: int,
             extra: list[str] = ()) -> Job:
    """One run of one arm; a timing stage ("timing_<speed>") names its train.speed."""
    a = ARMS[arm]
    ov = [f"+experiment=allocators_{task}", f"method={a.method}", f"method.r={budget}", *a.overrides,
          f"train.lr={lr:g}", f"seed={seed}"]
    if stage.startswith("timing_"):
        ov.append(f"train.speed={stage.removeprefix('timing_')}")
    out = group_dir(root, stage, task, arm, budget) / run_name(lr, seed)
    return Job(out, ov + list(extra), {"stage": stage, "group": (task, arm, budget), "lr": lr, "seed": seed})


class Plan:
    """The study's jobs, handed out as their dependencies finish (`initial`, then `ready` after each job).
    `lrs`: one grid for every arm instead of the per-family ones (None: each arm's own)."""

    def __init__(self, root: Path, tasks=TASKS, budgets=BUDGETS, lrs=None, seeds=SEEDS, select_seed=SELECT_SEED,
                 arms=DEFAULT_ARMS, extra: list[str] = (), stages=("select", "final"), timing_tasks=TIMING_TASKS,
                 timing_speeds=TIMING_SPEEDS, timing_seed=TIMING_SEED) -> None:
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            raise ValueError(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(ARMS)}")
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise ValueError(f"--stages: unknown {', '.join(bad)}; choose from {', '.join(STAGES)}")
        if "timing" in stages and len(stages) > 1:
            raise ValueError("--stages: timing runs alone (one job per GPU, nothing beside it): call it on its own")
        stray = [t for t in timing_tasks if t not in tasks]
        if "timing" in stages and stray:
            raise ValueError(f"--timing-tasks: {', '.join(stray)} not among --tasks")
        self.root, self.seeds, self.select_seed, self.extra = Path(root), list(seeds), select_seed, list(extra)
        self.stages, self.timing_tasks, self.timing_speeds = tuple(stages), list(timing_tasks), list(timing_speeds)
        self.timing_seed = timing_seed
        self.arms = [a for a in ARMS if a in arms]  # ARMS order: adalora first, so its runs start first
        self.grids = {a: list(lrs) if lrs is not None else list(ARMS[a].lrs) for a in self.arms}
        self.cells = [(t, b) for t in sorted(tasks, key=lambda t: -COST.get(t, 0)) for b in budgets]
        # (task, arm, budget) -> lr -> the selection run's folder
        self.selects = {(t, a, b): {lr: group_dir(self.root, "select", t, a, b) / run_name(lr, select_seed)
                                    for lr in self.grids[a]} for t, b in self.cells for a in self.arms}
        self.chosen: dict[tuple, float] = {}
        self.issued: set[Path] = set()

    def _issue(self, jobs: list[Job]) -> list[Job]:
        new = [j for j in jobs if j.out not in self.issued]
        self.issued.update(j.out for j in new)
        return new

    def initial(self) -> list[Job]:
        """Every selection job (none depends on another), then whatever is ready already."""
        jobs = []
        if "select" in self.stages:
            jobs = [make_job(self.root, "select", t, a, b, lr, self.select_seed, self.extra)
                    for (t, a, b), runs in self.selects.items() for lr in runs]
        return self._issue(jobs) + self.ready()

    def ready(self) -> list[Job]:
        """New jobs whose group's rate has been chosen (all its selection runs ended): its finals, or in the
        timing stage its timing runs."""
        jobs: list[Job] = []
        for g, runs in self.selects.items():
            if g not in self.chosen:  # also from an earlier call's selection runs (--stages final / timing)
                lr = choose_lr(runs)
                if lr is not None:
                    self.chosen[g] = lr
        for (task, arm, budget), lr in self.chosen.items():
            if "final" in self.stages:
                jobs += [make_job(self.root, "final", task, arm, budget, lr, s, self.extra) for s in self.seeds]
            if "timing" in self.stages and task in self.timing_tasks:
                jobs += [make_job(self.root, f"timing_{sp}", task, arm, budget, lr, self.timing_seed, self.extra)
                         for sp in self.timing_speeds]
        return self._issue(jobs)

    def planned(self) -> dict[str, int]:
        """How many runs the full plan has, per stage."""
        per_cell = {a: len(g) for a, g in self.grids.items()}
        return {"select": len(self.cells) * sum(per_cell.values()) if "select" in self.stages else 0,
                "final": len(self.cells) * len(self.arms) * len(self.seeds) if "final" in self.stages else 0,
                "timing": (len([c for c in self.cells if c[0] in self.timing_tasks]) * len(self.arms)
                           * len(self.timing_speeds)) if "timing" in self.stages else 0}

    def state(self) -> dict:
        """What sweep_state.json records: the grid, the chosen rates."""
        return {"grids": self.grids, "seeds": self.seeds, "select_seed": self.select_seed, "arms": self.arms,
                "cells": [list(c) for c in self.cells], "planned": self.planned(),
                "chosen": {"/".join(map(str, g)): lr for g, lr in sorted(self.chosen.items())}}
