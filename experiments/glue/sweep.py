"""The GLUE reproduction's stages, as single runs of the official CLI packed onto the GPUs of one host.

    python experiments/glue/sweep.py --root multirun/glue --gpus 4 --per-gpu 14 [--tasks sst2 cola mrpc]
        [--lrs 2e-5 5e-5 1e-4 5e-4 2e-3 5e-3 1e-2] [--stages select final levers]
        [--launch-until 480 --kill-at 560] [-- EXTRA HYDRA OVERRIDES]

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

Every job is `python -m adarank.run +experiment=glue_minilm_<task> method=<m> method.r=<B> train.lr=<lr>
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments"), str(Path(__file__).resolve().parent)]

from jobqueue import Job, run_queue
from levers import LEVERS, PEFT_HAS, candidate, confirmed, gains, summarize

from adarank.atomic import atomic_write_json
from adarank.report import choose_lr as report_choose_lr
from adarank.report import load_row, lower_is_better

METHODS = ("full", "lora", "rslora", "adalora", "peft_adalora")
SEEDS = {2: (0, 1, 2, 3, 4), 8: (0, 1, 2)}
COST = {"sst2": 3, "cola": 2, "mrpc": 1}
LRS = (2e-5, 5e-5, 1e-4, 5e-4, 2e-3, 5e-3, 1e-2)  # one grid for every method  # rough relative run time, to start the longest jobs first


def make_job(root: Path, stage: str, task: str, method: str, budget: int, lr: float, seed: int, extra: list[str],
             lever: str | None = None, folder: str | None = None) -> Job:
    """One run. `lever` adds that lever's overrides; `folder` (the lever's name, or "default") is a sub-folder
    between the method and the run, used by the lever screen."""
    name = "full" if method == "full" else f"{method}_r{budget}"
    out = root / stage / task / name / (folder or "") / f"lr{lr:g}_seed{seed}"
    ov = [f"+experiment=glue_minilm_{task}", f"method={method}", f"method.r={budget}", f"train.lr={lr:g}",
          f"seed={seed}", *(LEVERS[lever] if lever else []), *extra]
    if method == "full":
        ov.insert(2, "method.lr=null")  # the full method's own default (5e-5) would override the grid
    return Job(out, ov, {"stage": stage, "group": (task, method, budget), "lr": lr, "lever": lever, "seed": seed})


def select_jobs(root: Path, tasks: list[str], lrs: list[float], seed: int, extra: list[str]) -> list[Job]:
    jobs = []
    for task in sorted(tasks, key=lambda t: -COST.get(t, 0)):
        for budget in SEEDS:
            for method in METHODS:
                if method == "full" and budget != 2:
                    continue
                jobs += [make_job(root, "select", task, method, budget, lr, seed, extra) for lr in lrs]
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


def val_value(job: Job) -> float | None:
    """The job's validation metric at its best step; None for a diverged or unfinished job."""
    path = job.out / "results.json"
    return load_row(path)["val_value"] if path.exists() else None


def supersede(root: Path, task: str, method: str, budget: int, lr: float) -> None:
    """Move final runs of this group made at another learning rate (an earlier, narrower grid chose it) to
    <root>/superseded/, so that the final folder holds only runs at the current choice."""
    name = "full" if method == "full" else f"{method}_r{budget}"
    keep = f"lr{lr:g}_"
    for d in sorted((root / "final" / task / name).glob("lr*_seed*")):
        if not d.name.startswith(keep):
            dest = root / "superseded" / d.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            d.rename(dest)


class Levers:
    """The lever study of levers.py over the adalora cells: screen (one seed), confirm (a second seed), then
    final runs with the adopted lever under <root>/final_<lever>/. Decisions are recomputed from the run
    folders, so a resumed sweep reaches the same ones."""

    def __init__(self, root: Path, cells: list[tuple], screen_seed: int, confirm_seed: int, base: list[str]):
        self.root, self.cells, self.base = root, cells, base
        self.seeds = (screen_seed, confirm_seed)
        self.screen: dict[tuple, list[Job]] = {}
        self.confirm: list[Job] | None = None
        self.finals: list[Job] | None = None
        self.state: dict = {"rule": "levers.py", "screen": {}, "candidate": None, "confirm": None, "adopted": None}

    def lever_job(self, cell, lr, seed, lever, method="adalora"):
        task, _, budget = cell
        return make_job(self.root, "levers", task, method, budget, lr, seed, self.base,
                        lever=lever, folder=lever or "default")

    def step(self, chosen: dict[tuple, float], defaults: dict[tuple, Job]) -> list[Job]:
        """New jobs, given the chosen learning rates and the default's selection run per adalora cell."""
        new = []
        for cell in self.cells:
            if cell in chosen and cell not in self.screen:
                self.screen[cell] = [self.lever_job(cell, chosen[cell], self.seeds[0], lv) for lv in LEVERS]
                new += self.screen[cell]
        if len(self.screen) < len(self.cells) or not all(j.done() for js in self.screen.values() for j in js):
            return new
        if self.confirm is None:
            default = {c: val_value(defaults[c]) for c in self.cells}
            for lv in LEVERS:
                own = {c: val_value(next(j for j in self.screen[c] if j.tags["lever"] == lv)) for c in self.cells}
                self.state["screen"][lv] = summarize(gains(own, default))
            cand = candidate(self.state["screen"])
            self.state["candidate"] = cand
            self.confirm = [] if cand is None else [self.lever_job(c, chosen[c], self.seeds[1], lv)
                                                    for c in self.cells for lv in (cand, None)]
            new += self.confirm
        if self.finals is not None or not all(j.done() for j in self.confirm):
            return new
        cand = self.state["candidate"]
        if cand is not None:
            own = {j.tags["group"]: val_value(j) for j in self.confirm if j.tags["lever"] == cand}
            default = {j.tags["group"]: val_value(j) for j in self.confirm if j.tags["lever"] is None}
            self.state["confirm"] = summarize(gains(own, {c: default[c] for c in self.cells}))
            self.state["adopted"] = cand if confirmed(self.state["confirm"]) else None
        self.finals = []
        lever = self.state["adopted"]
        if lever is not None:
            methods = ["adalora"] + (["peft_adalora"] if lever in PEFT_HAS else [])
            for task, _, budget in self.cells:
                for m in methods:
                    lr = chosen.get((task, m, budget))
                    if lr is not None:
                        self.finals += [make_job(self.root, f"final_{lever}", task, m, budget, lr, s, self.base, lever=lever)
                                        for s in SEEDS[budget]]
        return new + self.finals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="multirun/glue")
    ap.add_argument("--tasks", nargs="+", default=["sst2", "cola", "mrpc"])
    ap.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    ap.add_argument("--select-seed", type=int, default=100)
    ap.add_argument("--confirm-seed", type=int, default=101, help="the lever study's second seed")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--per-gpu", type=int, default=8)
    ap.add_argument("--launch-until", type=float, default=float("inf"), help="seconds after which no job starts")
    ap.add_argument("--kill-at", type=float, default=float("inf"), help="seconds after which running jobs are stopped")
    ap.add_argument("--stages", nargs="+", default=["select", "final", "levers"], choices=["select", "final", "levers"])
    ap.add_argument("extra", nargs="*", help="more Hydra overrides for every job (after --)")
    args = ap.parse_args()

    root = (ROOT / args.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    base = ["resume=true", "wandb.mode=disabled", "train.progress=false", f"data.cache_dir={root / 'cache'}", *args.extra]
    selects = select_jobs(root, args.tasks, args.lrs, args.select_seed, base)
    groups: dict[tuple, list[Job]] = {}
    for j in selects:
        groups.setdefault(j.tags["group"], []).append(j)
    chosen: dict[str, dict] = {}
    chosen_lr: dict[tuple, float] = {}
    finals_queued: set[tuple] = set()
    cells = [g for g in groups if g[1] == "adalora"]
    levers = Levers(root, cells, args.select_seed, args.confirm_seed, base) if "levers" in args.stages else None
    state_path = root / "sweep_state.json"
    log: list[dict] = json.loads(state_path.read_text())["jobs"] if state_path.exists() else []

    def save() -> None:
        atomic_write_json(state_path, {"lrs": args.lrs, "select_seed": args.select_seed, "chosen": chosen,
                                       "levers": levers.state if levers else None, "jobs": log})

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
                new += [make_job(root, "final", task, method, budget, lr, s, base) for s in SEEDS[budget]]
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
