"""Runs the allocators comparison (plan.py) as single runs of the official CLI packed onto one host's GPUs.

    python experiments/allocators/driver.py --root multirun/allocators --gpus 4 --per-gpu 14 \
        [--tasks sst2 cola mrpc] [--budgets 2 8] [--lrs ...] [--seeds 0 1 2 3 4] \
        [--arms adalora eva sora increlora lora [sora_fixed]] [--stages select final] \
        [--launch-until 470 --kill-at 555] [-- EXTRA HYDRA OVERRIDES]
    python experiments/allocators/driver.py --root multirun/allocators --gpus 4 --stages timing \
        [--timing-tasks mrpc] [--timing-speeds eager auto]

Every job is `python -m adarank.run +experiment=allocators_<task> method=<m> method.r=<B> train.lr=<lr> seed=<s>
resume=true ... hydra.run.dir=<root>/<stage>/<task>/<arm>_r<B>/lr<lr>_seed<s>`, through experiments/jobqueue.py:
a finished job (results.json or diverged.json) is skipped, so calling this again continues the study, and a job
stopped at --kill-at resumes from its checkpoint. A group's finals start as soon as its selection runs have all
ended. `--stages timing` runs one job per GPU whatever --per-gpu says (a packed GPU's step time measures the
neighbours too), after the selection: it needs the chosen rates. <root>/sweep_state.json records the grids, the
chosen learning rates and every job's outcome. The tables: tables.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent), str(HERE)]

from jobqueue import run_queue  # noqa: E402
from plan import ARMS, BUDGETS, DEFAULT_ARMS, SEEDS, SELECT_SEED, TASKS, TIMING_SPEEDS, TIMING_TASKS, Plan  # noqa: E402
from multiarm import add_queue_args, job_overrides, run_plan  # noqa: E402

from adarank.runner.speed import SPEEDS  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="multirun/allocators")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    ap.add_argument("--lrs", nargs="+", type=float, default=None,
                    help="one grid for every arm (default: each arm's family grid, plan.py)")
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--select-seed", type=int, default=SELECT_SEED)
    ap.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), help=f"a subset of {', '.join(ARMS)}")
    ap.add_argument("--stages", nargs="+", default=["select", "final"], help="select final, or timing alone")
    ap.add_argument("--timing-tasks", nargs="+", default=list(TIMING_TASKS))
    ap.add_argument("--timing-speeds", nargs="+", default=list(TIMING_SPEEDS), choices=SPEEDS)
    add_queue_args(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None, queue_runner: Callable = run_queue) -> int:
    """Run (or continue) the study; `queue_runner` is jobqueue.run_queue (a test passes one that runs in-process)."""
    args = parse(argv)
    root = Path(args.root).resolve()
    base = job_overrides(root, args.extra)
    try:
        plan = Plan(root, args.tasks, args.budgets, args.lrs, args.seeds, args.select_seed, args.arms, base,
                    args.stages, args.timing_tasks, args.timing_speeds)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    per_gpu = 1 if "timing" in plan.stages else args.per_gpu  # timing: alone on its GPU
    log, left = run_plan(plan, root, args.gpus, per_gpu, args.launch_until, args.kill_at, queue_runner)
    done = sum(1 for e in log if e["outcome"] == "finished")
    waiting = len(plan.selects) - len(plan.chosen)
    print(f"allocators: {done} jobs finished in all; {len(left)} not started; {len(plan.chosen)} learning rates "
          f"chosen, {waiting} groups still selecting; plan {plan.planned()}; state in {root / 'sweep_state.json'}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
