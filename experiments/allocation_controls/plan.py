"""The allocation-controls study's grid (issue 19, part 6): which runs, in which order, with which pattern.

Arms, each at budgets 2 and 8 on SST-2, CoLA and MRPC with MiniLM (conf/experiment/allocation_controls_<task>):

| arm | run | what it controls |
|---|---|---|
| adalora | `method=adalora` (r_init = 1.5 B, pruned to B) | the full method |
| svd | `method=svd` (the same P·diag(λ)·Q at rank B, no allocation) | pruning: adalora against it |
| lora_learned | LoRA with adalora's final ranks of the same seed | the learned allocation |
| lora_shuffled | the same ranks permuted over the modules (`rank_pattern_seed` = the run's seed) | allocation |
| lora_uniform | the same total spread evenly (B per module: equal to plain LoRA by construction) | allocation |
| lora_reversed | the same ranks with the layers reversed | allocation (depth) |
| lora, rslora | plain LoRA / rsLoRA at r = B | parameterisation: svd against lora |

Protocol (the GLUE study's, experiments/glue/sweep.py): stage `select` runs every arm at every learning rate of
the grid with the selection seed (100, not a reported seed); each (task, arm, budget) takes the rate with the best
carved-validation metric (the report's rule; the official dev set plays no part); stage `final` runs it with seeds
0-4. A pattern arm needs the matching adalora run: in `select`, adalora's selection run at adalora's chosen rate;
in `final`, adalora's final run of the same seed. So a pattern arm's selection waits for adalora's selection of its
(task, budget), and each of its final runs for one adalora final run; `Plan.ready` hands out jobs as their
dependencies finish. A pattern whose adalora run diverged leaves its dependants out (listed in `Plan.state`).

Runs go to <root>/<stage>/<task>/<arm>_r<budget>/lr<lr>_seed<seed> (experiments/glue/layout.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent), str(HERE.parent / "glue")]

from jobqueue import Job  # noqa: E402
from layout import group_dir, run_name  # noqa: E402
from multiarm import choose_lr  # noqa: E402, F401  (the shared rule, experiments/multiarm.py)

TASKS = ("sst2", "cola", "mrpc")
BUDGETS = (2, 8)
SEEDS = (0, 1, 2, 3, 4)
SELECT_SEED = 100
#: spans LoRA's chosen 5e-4 and the SVD adapters' 2e-3 / 5e-3 in results/glue, with a rate either side
LRS = (2e-4, 5e-4, 1e-3, 2e-3, 5e-3)
COST = {"sst2": 3, "cola": 2, "mrpc": 1}  # rough relative run time: the longest tasks start first
SOURCE = "adalora"  # the arm whose learned pattern the pattern arms take


@dataclass(frozen=True)
class Arm:
    """One arm: its method and, for a pattern arm, the control applied to adalora's learned ranks."""

    method: str
    pattern: bool = False
    """Whether it takes adalora's final ranks as `method.rank_pattern`."""
    transform: str | None = None
    """`method.rank_pattern_transform` (null: the learned pattern as it is)."""


ARMS = {
    "adalora": Arm("adalora"),
    "svd": Arm("svd"),
    "lora_learned": Arm("lora", pattern=True),
    "lora_shuffled": Arm("lora", pattern=True, transform="shuffle"),
    "lora_uniform": Arm("lora", pattern=True, transform="uniform"),
    "lora_reversed": Arm("lora", pattern=True, transform="reverse_layers"),
    "lora": Arm("lora"),
    "rslora": Arm("rslora"),
}


def arm_of(config: dict) -> str:
    """The arm a finished run belongs to, from its results.json ``config`` (a pattern arm is LoRA with a
    rank pattern and its transform)."""
    m = config["method"]
    if not m.get("rank_pattern"):
        return m["name"]
    return next(a for a, arm in ARMS.items() if arm.pattern and arm.method == m["name"]
                and arm.transform == m.get("rank_pattern_transform"))


def make_job(root: Path, stage: str, task: str, arm: str, budget: int, lr: float, seed: int, extra: list[str],
             pattern: Path | None = None) -> Job:
    """One run of one arm; `pattern`: the adalora run folder whose final ranks a pattern arm uses."""
    a = ARMS[arm]
    if a.pattern != (pattern is not None):
        raise ValueError(f"{arm}: {'needs' if a.pattern else 'takes no'} pattern run")
    ov = [f"+experiment=allocation_controls_{task}", f"method={a.method}", f"method.r={budget}", f"train.lr={lr:g}",
          f"seed={seed}"]
    if pattern is not None:
        ov.append(f"method.rank_pattern={pattern}")
        if a.transform is not None:
            ov.append(f"method.rank_pattern_transform={a.transform}")
        if a.transform == "shuffle":
            ov.append(f"method.rank_pattern_seed={seed}")  # a different shuffle per seed
    out = group_dir(root, stage, task, arm, budget) / run_name(lr, seed)
    return Job(out, ov + list(extra), {"stage": stage, "group": (task, arm, budget), "lr": lr, "seed": seed,
                                       "pattern": None if pattern is None else str(pattern)})


class Plan:
    """The study's jobs, handed out as their dependencies finish (`initial`, then `ready` after each job)."""

    def __init__(self, root: Path, tasks=TASKS, budgets=BUDGETS, lrs=LRS, seeds=SEEDS, select_seed=SELECT_SEED,
                 arms=tuple(ARMS), extra: list[str] = (), stages=("select", "final")) -> None:
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            raise ValueError(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(ARMS)}")
        if any(ARMS[a].pattern for a in arms) and SOURCE not in arms:
            raise ValueError(f"--arms: the pattern arms need {SOURCE}, whose runs give their patterns")
        self.root, self.lrs, self.seeds, self.select_seed = Path(root), list(lrs), list(seeds), select_seed
        self.extra, self.stages = list(extra), tuple(stages)
        self.cells = [(t, b) for t in sorted(tasks, key=lambda t: -COST.get(t, 0)) for b in budgets]
        self.arms = [a for a in ARMS if a in arms]  # ARMS order: adalora first, so its runs start first
        # (task, arm, budget) -> lr -> the selection run's folder
        self.selects = {(t, a, b): {lr: group_dir(self.root, "select", t, a, b) / run_name(lr, select_seed)
                                    for lr in self.lrs} for t, b in self.cells for a in self.arms}
        self.chosen: dict[tuple, float] = {}
        self.issued: set[Path] = set()
        self.left_out: dict[str, str] = {}  # run folder -> why it cannot run

    def _job(self, stage, task, arm, budget, lr, seed, pattern=None) -> Job:
        return make_job(self.root, stage, task, arm, budget, lr, seed, self.extra, pattern)

    def _issue(self, jobs: list[Job]) -> list[Job]:
        new = [j for j in jobs if j.out not in self.issued]
        self.issued.update(j.out for j in new)
        return new

    def initial(self) -> list[Job]:
        """The selection jobs that need no pattern (adalora's first), then whatever is ready already."""
        jobs = []
        if "select" in self.stages:
            jobs = [self._job("select", t, a, b, lr, self.select_seed) for (t, a, b), runs in self.selects.items()
                    if not ARMS[a].pattern for lr in runs]
        return self._issue(jobs) + self.ready()

    def _source(self, stage: str, task: str, budget: int, seed: int) -> Path | None:
        """The adalora run a pattern arm's run takes its ranks from, once it has finished (None before)."""
        lr = self.chosen.get((task, SOURCE, budget))
        if lr is None:
            return None
        return group_dir(self.root, stage, task, SOURCE, budget) / run_name(lr, seed)

    def _pattern_job(self, stage, task, arm, budget, lr, seed) -> Job | None:
        src = self._source(stage, task, budget, seed)
        if src is None:
            return None
        if (src / "results.json").exists():
            return self._job(stage, task, arm, budget, lr, seed, src)
        if (src / "diverged.json").exists():
            self.left_out[str(group_dir(self.root, stage, task, arm, budget) / run_name(lr, seed))] = \
                f"its pattern run {src} diverged"
        return None

    def ready(self) -> list[Job]:
        """New jobs whose dependencies have finished: a pattern arm's selection once adalora's rate is chosen,
        a group's finals once its rate is chosen, a pattern arm's final once its adalora final has finished."""
        jobs: list[Job] = []
        for g, runs in self.selects.items():
            if g not in self.chosen:  # also from an earlier call's selection runs (--stages final)
                lr = choose_lr(runs)
                if lr is not None:
                    self.chosen[g] = lr
        for task, arm, budget in self.selects:
            if ARMS[arm].pattern and "select" in self.stages:
                jobs += [j for lr in self.lrs if (j := self._pattern_job("select", task, arm, budget, lr,
                                                                          self.select_seed)) is not None]
            lr = self.chosen.get((task, arm, budget))
            if lr is None or "final" not in self.stages:
                continue
            if not ARMS[arm].pattern:
                jobs += [self._job("final", task, arm, budget, lr, s) for s in self.seeds]
            else:
                jobs += [j for s in self.seeds if (j := self._pattern_job("final", task, arm, budget, lr, s)) is not None]
        return self._issue(jobs)

    def planned(self) -> dict[str, int]:
        """How many runs the full plan has, per stage."""
        n = len(self.cells) * len(self.arms)
        return {"select": n * len(self.lrs) if "select" in self.stages else 0,
                "final": n * len(self.seeds) if "final" in self.stages else 0}

    def state(self) -> dict:
        """What sweep_state.json records: the grid, the chosen rates, the runs left out."""
        return {"lrs": self.lrs, "seeds": self.seeds, "select_seed": self.select_seed, "arms": self.arms,
                "cells": [list(c) for c in self.cells], "planned": self.planned(),
                "chosen": {"/".join(map(str, g)): lr for g, lr in sorted(self.chosen.items())},
                "left_out": dict(sorted(self.left_out.items()))}
