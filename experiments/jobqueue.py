"""Single runs of the official CLI packed onto the GPUs of one host, for the sweeps in experiments/.

Each job is `python -m adarank.run <overrides> hydra.run.dir=<out>`, the command a user types. A small model
leaves an H200 mostly idle, so `per_gpu` jobs share each GPU (CUDA_VISIBLE_DEVICES picks it, OMP_NUM_THREADS=1
keeps them off each other's CPU cores). A job whose folder holds results.json or diverged.json is done and
skipped, so calling a sweep again continues it; a job stopped at `kill_at` resumes from its last checkpoint
when its overrides include `resume=true`. Hydra's joblib launcher does the same for one multirun; this queue
also takes jobs that only become known while it runs (a learning rate chosen from finished jobs, say).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Job:
    """One run: its output folder and its Hydra overrides (hydra.run.dir is added)."""

    out: Path
    overrides: list[str]
    tags: dict = field(default_factory=dict)

    def done(self) -> bool:
        return (self.out / "results.json").exists() or (self.out / "diverged.json").exists()

    def command(self) -> list[str]:
        return [sys.executable, "-m", "adarank.run", *self.overrides, f"hydra.run.dir={self.out}"]


def outcome(job: Job, returncode: int | None) -> str:
    if (job.out / "results.json").exists():
        return "finished"
    if (job.out / "diverged.json").exists():
        return "diverged"
    return f"stopped (exit {returncode})"


def run_queue(queue: list[Job], gpus: int, per_gpu: int, launch_until: float = float("inf"),
              kill_at: float = float("inf"), on_end: Callable[[Job, str, float], list[Job]] | None = None,
              log: Callable[[str], None] = lambda m: print(m, flush=True)) -> list[Job]:
    """Run `queue` (in order) with `per_gpu` jobs per GPU; returns the jobs that did not run.

    No job starts after `launch_until` seconds; running jobs are stopped (SIGTERM) at `kill_at`.
    `on_end(job, outcome, seconds)` is called as each job ends and may return new jobs, appended to the queue.
    """
    queue = [j for j in queue if not j.done()]
    t0 = time.time()
    slots: list[tuple[subprocess.Popen, Job, float] | None] = [None] * max(1, gpus * per_gpu)
    while True:
        now = time.time() - t0
        for i, s in enumerate(slots):
            if s is None:
                continue
            proc, job, started = s
            if proc.poll() is None and now < kill_at:
                continue
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            what = outcome(job, proc.returncode)
            log(f"[{now:6.0f}s] {what}: {job.out}")
            slots[i] = None
            if on_end is not None:
                queue.extend(j for j in on_end(job, what, round(now - started, 1)) if not j.done())
        if now >= kill_at:
            break
        for i, s in enumerate(slots):
            if s is not None or not queue or now >= launch_until:
                continue
            job = queue.pop(0)
            job.out.mkdir(parents=True, exist_ok=True)
            env = os.environ | {"CUDA_VISIBLE_DEVICES": str(i % max(1, gpus)), "OMP_NUM_THREADS": "1"}
            with open(job.out / "job.log", "a") as f:
                f.write("$ " + shlex.join(["python"] + job.command()[1:]) + "\n")
                f.flush()
                slots[i] = (subprocess.Popen(job.command(), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), job, now)
        if all(s is None for s in slots) and (not queue or now >= launch_until):
            break
        time.sleep(0.5)
    return queue
