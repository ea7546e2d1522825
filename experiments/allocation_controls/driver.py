"""Runs the allocation-controls study (plan.py) as single runs of the official CLI packed onto one host's GPUs.

    python experiments/allocation_controls/driver.py --root multirun/allocation_controls --gpus 4 --per-gpu 14 \
        [--tasks sst2 cola mrpc] [--budgets 2 8] [--lrs 2e-4 5e-4 1e-3 2e-3 5e-3] [--seeds 0 1 2 3 4]
        [--arms adalora svd lora_learned ...] [--stages select final] [--launch-until 470 --kill-at 555]
        [-- EXTRA HYDRA OVERRIDES]

Every job is `python -m adarank.run +experiment=allocation_controls_<task> method=<m> method.r=<B> train.lr=<lr>
seed=<s> [method.rank_pattern=<adalora run> ...] resume=true ... hydra.run.dir=<root>/<stage>/<task>/<arm>_r<B>/
lr<lr>_seed<s>`, through experiments/jobqueue.py: a finished job (results.json or diverged.json) is skipped, so
calling this again continues the study, and a job stopped at --kill-at resumes from its checkpoint. The plan
hands out the pattern arms' jobs as the adalora runs they depend on finish. <root>/sweep_state.json records the
grid, the chosen learning rates, the runs left out and every job's outcome. The tables: tables.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent), str(HERE)]

from jobqueue import run_queue  # noqa: E402
from plan import ARMS, BUDGETS, LRS, SEEDS, SELECT_SEED, TASKS, Plan  # noqa: E402
from multiarm import add_queue_args, job_overrides, run_plan  # noqa: E402


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="multirun/allocation_controls")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    ap.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    ap.add_argument("--select-seed", type=int, default=SELECT_SEED)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), help=f"a subset of {', '.join(ARMS)}")
    ap.add_argument("--stages", nargs="+", default=["select", "final"], choices=["select", "final"])
    add_queue_args(ap)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None, queue_runner: Callable = run_queue) -> int:
    """Run (or continue) the study; `queue_runner` is jobqueue.run_queue (a test passes one that runs in-process)."""
    args = parse(argv)
    root = Path(args.root).resolve()
    base = job_overrides(root, args.extra)
    try:
        plan = Plan(root, args.tasks, args.budgets, args.lrs, args.seeds, args.select_seed, args.arms, base, args.stages)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log, left = run_plan(plan, root, args.gpus, args.per_gpu, args.launch_until, args.kill_at, queue_runner)
    done = sum(1 for e in log if e["outcome"] == "finished")
    print(f"allocation_controls: {done} jobs finished in all; {len(left)} not started; {len(plan.chosen)} learning "
          f"rates chosen; {len(plan.left_out)} runs left out; plan {plan.planned()}; state in {root / 'sweep_state.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
