"""The GLUE reproduction's stages, as single runs of the official CLI packed onto the GPUs of one host.

    python experiments/glue/sweep.py --root multirun/glue --gpus 4 --per-gpu 14 [--tasks sst2 cola mrpc]
        [--lrs 2e-5 5e-5 1e-4 5e-4 2e-3 5e-3 1e-2] [--stages select final levers]
        [--launch-until 480 --kill-at 560] [-- EXTRA HYDRA OVERRIDES]
    python experiments/glue/sweep.py --study paper --root multirun/glue_mpnet --gpus 4 --per-gpu 4
        [--lr-factors 0.5 1 2] [--stages select final] ...

Two studies share this protocol (`STUDIES`). `minilm` (the default, results/glue): the glue_minilm_<task>
experiments, budgets 2 and 8, one lr grid (--lrs) for every method. `paper` (results/glue_mpnet): the
glue_paper_<task> experiments (MPNet-base with the official AdaLoRA scripts' settings); adalora and PEFT's
AdaLoRA at the scripts' final rank 1 (from r_init 2, or 3 on CoLA), LoRA and rsLoRA at r = 1 (the kept
parameters matched) and r = r_init (the parameters trained at the start matched; r = 2 on every task as
well), full fine-tuning once; 5 seeds everywhere; the lr grid is the script's lr times --lr-factors for
the adapter methods, and FULL_LRS for full fine-tuning. The lever stage belongs to the minilm study.

Stage 1 (select): every method at every budget on every task, once per learning rate of the grid, with
seed 100 (not one of the reported seeds). The learning rate of each (task, method, budget) is the one with
the best carved-validation metric (`val/<metric>` at the best step); the official dev set plays no part.
Stage 2 (final): each (task, method, budget) at its chosen learning rate with seeds 0-4 (budget 2) or 0-2
(budget 8). Full fine-tuning has no budget: it runs once per seed, next to budget 2. Final runs made at
another learning rate (an earlier, narrower grid chose it) are moved to <root>/superseded/.
Stage 3 (levers): the lever study of levers.py on adalora, at each cell's chosen learning rate: a screen with
the selection seed under <root>/levers/, a confirmation of the best lever with --confirm-seed, and, if it is
adopted, the final runs of adalora (and PEFT's AdaLoRA when PEFT has that knob) with it under
<root>/final_<lever>/.

Every job is `python -m adarank.run +experiment=glue_<study>_<task> method=<m> method.r=<B> train.lr=<lr>
seed=<s> hydra.run.dir=<root>/<stage>/<task>/<m>_r<B>/lr<lr>_seed<s> resume=true`, the same command a user
types; the equivalent Hydra multiruns are in each experiment file. MiniLM leaves an H200 mostly idle, so
`--per-gpu` jobs share each GPU (CUDA_VISIBLE_DEVICES picks it). A finished job (results.json, or
diverged.json for a job that diverged) is skipped, so calling this again continues a sweep; a job killed at
`--kill-at` resumes from its last checkpoint. `<root>/sweep_state.json` records the chosen learning rates,
the lever study's scores and decisions, and every job's outcome.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments"), str(Path(__file__).resolve().parent)]

from jobqueue import Job, run_queue
from layout import group_dir, lr_prefix, run_name
from levers import LEVERS, Levers

from adarank.atomic import atomic_write_json
from adarank.studies.report import choose_lr as report_choose_lr
from adarank.studies.report import load_row, lower_is_better

METHODS = ("full", "lora", "rslora", "adalora", "peft_adalora")
SEEDS = {2: (0, 1, 2, 3, 4), 8: (0, 1, 2)}
COST = {"sst2": 3, "cola": 2, "mrpc": 1}  # rough relative run time, to start the longest jobs first
LRS = (2e-5, 5e-5, 1e-4, 5e-4, 2e-3, 5e-3, 1e-2)  # one grid for every method

#: The paper study. The official scripts' learning rate per task (NLU/scripts/run_debertav3_<task>.sh: SST-2 and
#: CoLA 8e-4, MRPC 1e-3) and initial rank (lora_r: 2, CoLA 3); the adaptive methods' final rank is 1 everywhere.
PAPER_LR = {"sst2": 8e-4, "cola": 8e-4, "mrpc": 1e-3}
PAPER_INIT_RANK = {"sst2": 2, "cola": 3, "mrpc": 2}
LR_FACTORS = (0.5, 1.0, 2.0)
FULL_LRS = (2e-5, 5e-5, 1e-4)  # full fine-tuning of a base-size encoder; the adapters' rates would wreck it
ADAPTIVE = ("adalora", "peft_adalora")


@dataclass(frozen=True)
class Study:
    """What differs between the GLUE studies; the protocol (select on the carved validation split with the
    selection seed, then the final seeds) is the same."""

    experiment: str
    """The experiment file of a task, with `{task}` in it."""
    budgets: Callable[[str, str], tuple[int, ...]]
    """(task, method) -> the method.r values it runs at (full fine-tuning: one, naming its group only)."""
    seeds: dict[int, tuple[int, ...]]
    """budget -> the seeds of the final runs."""
    lrs: Callable[[str, str, list[float]], list[float]]
    """(task, method, the --lrs or --lr-factors given) -> the learning-rate grid of the selection."""


def _minilm_budgets(task: str, method: str) -> tuple[int, ...]:
    return (2,) if method == "full" else tuple(SEEDS)


def _paper_budgets(task: str, method: str) -> tuple[int, ...]:
    if method == "full" or method in ADAPTIVE:
        return (1,)
    return tuple(sorted({1, 2, PAPER_INIT_RANK[task]}))


def _paper_lrs(task: str, method: str, factors: list[float]) -> list[float]:
    if method == "full":
        return list(FULL_LRS)
    return [float(f"{PAPER_LR[task] * f:.3g}") for f in factors]


STUDIES = {
    "minilm": Study("glue_minilm_{task}", _minilm_budgets, SEEDS, lambda task, method, lrs: list(lrs)),
    "paper": Study("glue_paper_{task}", _paper_budgets, {1: SEEDS[2], 2: SEEDS[2], 3: SEEDS[2]}, _paper_lrs),
}


def make_job(root: Path, stage: str, task: str, method: str, budget: int, lr: float, seed: int, extra: list[str],
             lever: str | None = None, folder: str | None = None, study: Study = STUDIES["minilm"]) -> Job:
    """One run. `lever` adds that lever's overrides; `folder` (the lever's name, or "default") is a sub-folder
    between the method and the run, used by the lever screen."""
    out = group_dir(root, stage, task, method, budget) / (folder or "") / run_name(lr, seed)
    ov = [f"+experiment={study.experiment.format(task=task)}", f"method={method}", f"method.r={budget}",
          f"train.lr={lr:g}", f"seed={seed}", *(LEVERS[lever] if lever else []), *extra]
    if method == "full":
        ov.insert(2, "method.lr=null")  # the full method's own default (5e-5) would override the grid
    return Job(out, ov, {"stage": stage, "group": (task, method, budget), "lr": lr, "lever": lever, "seed": seed})


def select_jobs(root: Path, tasks: list[str], lrs: list[float], seed: int, extra: list[str],
                study: Study = STUDIES["minilm"]) -> list[Job]:
    """Every (task, method, budget) of the study at every learning rate of its grid, with the selection seed;
    the longest tasks first. `lrs`: the grid (minilm) or the factors on the scripts' rate (paper)."""
    jobs = []
    for task in sorted(tasks, key=lambda t: -COST.get(t, 0)):
        groups = sorted({(b, m) for m in METHODS for b in study.budgets(task, m)}, key=lambda g: (g[0], METHODS.index(g[1])))
        for budget, method in groups:
            jobs += [make_job(root, "select", task, method, budget, lr, seed, extra, study=study)
                     for lr in study.lrs(task, method, lrs)]
    return jobs


def choose_lr(jobs: list[Job]) -> tuple[float, dict[str, float | None]] | None:
    """The learning rate with the best validation metric, by the report's rule (ties: the smaller); None
    until every job has ended or when none has a validation metric. Also returns each lr's score."""
    if not all(j.done() for j in jobs):
        return None
    rows = {j.tags["lr"]: load_row(j.out / "results.json") for j in jobs if (j.out / "results.json").exists()}
    scores = {f"{j.tags['lr']:g}": rows[j.tags["lr"]]["val_value"] if j.tags["lr"] in rows else None for j in jobs}
    ok = {lr: r["val_value"] for lr, r in rows.items() if r["val_value"] is not None}
    if not ok:
        return None
    return report_choose_lr(ok, lower_is_better(next(iter(rows.values()))["metric"])), scores


def supersede(root: Path, task: str, method: str, budget: int, lr: float, log=print) -> None:
    """Move final runs of this group made at another learning rate (an earlier, narrower grid chose it) to
    <root>/superseded/ (a numbered suffix when that name is taken), saying so, so that the final folder holds
    only runs at the current choice."""
    group = group_dir(root, "final", task, method, budget)
    for d in sorted(group.glob("lr*_seed*")):
        if d.name.startswith(lr_prefix(lr)):
            continue
        dest = root / "superseded" / d.relative_to(root)
        n = 1
        while dest.exists():
            dest, n = dest.with_name(f"{d.name}.{n}"), n + 1
        dest.parent.mkdir(parents=True, exist_ok=True)
        d.rename(dest)
        log(f"sweep: {task}/{group.name} now uses lr {lr:g}; moved {d.relative_to(root)} to {dest.relative_to(root)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--study", default="minilm", choices=list(STUDIES))
    ap.add_argument("--root", default="multirun/glue")
    ap.add_argument("--tasks", nargs="+", default=["sst2", "cola", "mrpc"])
    ap.add_argument("--lrs", nargs="+", type=float, default=list(LRS), help="the minilm study's grid")
    ap.add_argument("--lr-factors", nargs="+", type=float, default=list(LR_FACTORS),
                    help="the paper study's grid: these times the official script's lr (full fine-tuning: FULL_LRS)")
    ap.add_argument("--select-seed", type=int, default=100)
    ap.add_argument("--confirm-seed", type=int, default=101, help="the lever study's second seed")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--per-gpu", type=int, default=8)
    ap.add_argument("--launch-until", type=float, default=float("inf"), help="seconds after which no job starts")
    ap.add_argument("--kill-at", type=float, default=float("inf"), help="seconds after which running jobs are stopped")
    ap.add_argument("--stages", nargs="+", default=None, choices=["select", "final", "levers"],
                    help="default: select final levers (minilm), select final (paper)")
    ap.add_argument("extra", nargs="*", help="more Hydra overrides for every job (after --)")
    args = ap.parse_args()
    study = STUDIES[args.study]
    if args.stages is None:
        args.stages = ["select", "final", "levers"] if args.study == "minilm" else ["select", "final"]
    if "levers" in args.stages and args.study != "minilm":
        ap.error("--stages levers: the lever study is defined on the minilm study's defaults only")
    grid = args.lrs if args.study == "minilm" else args.lr_factors

    root = (ROOT / args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    base = ["resume=true", "wandb.mode=disabled", "train.progress=false", f"data.cache_dir={root / 'cache'}", *args.extra]
    selects = select_jobs(root, args.tasks, grid, args.select_seed, base, study)
    groups: dict[tuple, list[Job]] = {}
    for j in selects:
        groups.setdefault(j.tags["group"], []).append(j)
    chosen: dict[str, dict] = {}
    chosen_lr: dict[tuple, float] = {}
    finals_queued: set[tuple] = set()
    cells = [g for g in groups if g[1] == "adalora"]

    def make(stage, task, method, budget, lr, seed, lever, folder) -> Job:
        return make_job(root, stage, task, method, budget, lr, seed, base, lever=lever, folder=folder)

    levers = Levers(make, cells, args.select_seed, args.confirm_seed, SEEDS) if "levers" in args.stages else None
    state_path = root / "sweep_state.json"
    old = json.loads(state_path.read_text()) if state_path.exists() else {}
    log: list[dict] = old.get("jobs", [])

    def save() -> None:
        """The state file, merged with what an earlier call (maybe with other --tasks or --stages) recorded."""
        atomic_write_json(state_path, {"study": args.study, ("lrs" if args.study == "minilm" else "lr_factors"): grid,
                                       "select_seed": args.select_seed,
                                       "chosen": old.get("chosen", {}) | chosen,
                                       "levers": levers.state if levers else old.get("levers"), "jobs": log})

    def more() -> list[Job]:
        """The final jobs of every group whose selection has just ended, then the lever study's next jobs."""
        new = []
        for g, js in groups.items():
            pick = None if g in finals_queued else choose_lr(js)
            if pick is None:
                continue
            lr, scores = pick
            finals_queued.add(g)
            chosen_lr[g] = lr
            chosen["/".join(map(str, g))] = {"lr": lr, "val_by_lr": scores}
            if "final" in args.stages:
                task, method, budget = g
                supersede(root, task, method, budget, lr)
                new += [make_job(root, "final", task, method, budget, lr, s, base, study=study)
                        for s in study.seeds[budget]]
        if levers is not None:
            defaults = {g: next(j for j in groups[g] if j.tags["lr"] == chosen_lr[g]) for g in cells if g in chosen_lr}
            new += levers.step(chosen_lr, defaults)
        return new

    def on_end(job: Job, what: str, seconds: float) -> list[Job]:
        log.append({"stage": job.tags["stage"], "dir": str(job.out.relative_to(root)), "outcome": what, "seconds": seconds})
        new = more()
        save()
        return new

    queue = (list(selects) if "select" in args.stages else []) + more()
    left = run_queue(queue, args.gpus, args.per_gpu, args.launch_until, args.kill_at, on_end)
    save()
    print(f"sweep: {sum(1 for e in log if e['outcome'] == 'finished')} jobs finished in all; {len(left)} not started; "
          f"{len(chosen)} learning rates chosen; lever study: {levers.state if levers else 'off'}; state in {state_path}",
          flush=True)


if __name__ == "__main__":
    main()
