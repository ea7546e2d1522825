"""The sweep drivers in experiments/: the job queue, the GLUE stages, the rank-study job list.

The queue runs stand-in commands (a line of Python that writes results.json) so it is tested in seconds; the
job lists are checked by composing every job's overrides into a typed config, as the runner would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import adarank.run

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import jobqueue
from e2e import compose_config


def _load(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


glue_sweep = _load("glue_sweep", ROOT / "experiments" / "glue" / "sweep.py")
rank_sweep = _load("rank_sweep", ROOT / "experiments" / "rank_study" / "sweep.py")


class FakeJob(jobqueue.Job):
    """Runs `python -c CODE` instead of the trainer; CODE sees the output folder as sys.argv[1]."""

    code = "import json, sys, time; time.sleep(0.2); open(sys.argv[1] + '/results.json', 'w').write('{}')"

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.code, str(self.out)]


class SlowJob(FakeJob):
    code = "import time; time.sleep(30)"


class DivergingJob(FakeJob):
    code = "import sys; open(sys.argv[1] + '/diverged.json', 'w').write('{}'); sys.exit(3)"


def test_queue_runs_every_job_skips_done_ones_and_takes_new_jobs(tmp_path):
    done = FakeJob(tmp_path / "done", [])
    done.out.mkdir()
    (done.out / "results.json").write_text("{}")
    jobs = [FakeJob(tmp_path / f"j{i}", []) for i in range(5)] + [done, DivergingJob(tmp_path / "bad", [])]
    ended, follow_ups = [], [FakeJob(tmp_path / "after", [])]

    def on_end(job, what, seconds):
        ended.append((job.out.name, what))
        return [follow_ups.pop()] if follow_ups else []

    left = jobqueue.run_queue(jobs, gpus=2, per_gpu=2, on_end=on_end, log=lambda m: None)
    assert left == []
    assert sorted(ended) == sorted([(f"j{i}", "finished") for i in range(5)] + [("bad", "diverged"), ("after", "finished")])
    assert "done" not in dict(ended)  # finished before: never run again
    assert all((tmp_path / n / "job.log").read_text().startswith("$ python -c") for n, _ in ended)


def test_queue_stops_at_its_deadlines(tmp_path):
    jobs = [SlowJob(tmp_path / f"s{i}", []) for i in range(3)]
    ended = []
    left = jobqueue.run_queue(jobs, gpus=1, per_gpu=2, launch_until=0.5, kill_at=1.5,
                              on_end=lambda j, what, s: ended.append(what) or [], log=lambda m: None)
    assert [j.out.name for j in left] == ["s2"]  # never started
    assert len(ended) == 2 and all(w.startswith("stopped") for w in ended)


def test_glue_selection_jobs_and_learning_rate_choice(tmp_path):
    jobs = glue_sweep.select_jobs(tmp_path, ["mrpc"], [1e-4, 5e-4, 2e-3], 100, [])
    # 5 methods at budget 2, 4 at budget 8 (full has no budget), 3 learning rates each
    assert len(jobs) == (5 + 4) * 3
    full = [j for j in jobs if j.tags["group"][1] == "full"]
    assert len(full) == 3 and all("method.lr=null" in j.overrides for j in full)
    group = [j for j in jobs if j.tags["group"] == ("mrpc", "lora", 2)]
    assert glue_sweep.choose_lr(group) is None  # nothing has ended yet
    scores = {1e-4: 0.80, 5e-4: 0.85, 2e-3: None}  # the largest diverged
    for j in group:
        j.out.mkdir(parents=True)
        if scores[j.tags["lr"]] is None:
            (j.out / "diverged.json").write_text("{}")
        else:
            (j.out / "results.json").write_text(json.dumps(
                {"task": "mrpc", "method": "lora", "budget": 2, "seed": 100, "value": 0.8, "metric": "f1",
                 "metrics": {"best": {"val/f1": scores[j.tags["lr"]]}}}))
    lr, by_lr = glue_sweep.choose_lr(group)
    assert lr == 5e-4 and by_lr == {"0.0001": 0.80, "0.0005": 0.85, "0.002": None}


def test_glue_jobs_compose_into_valid_configs(tmp_path):
    for job in glue_sweep.select_jobs(tmp_path, ["sst2", "cola", "mrpc"], [1e-4], 100, ["wandb.mode=disabled"]):
        cfg = adarank.run.to_config(compose_config(job.overrides))
        task, method, budget = job.tags["group"]
        assert (cfg.task.name, cfg.method.name, cfg.train.lr) == (task, method, 1e-4)
        assert cfg.method.lr is None  # the grid's lr applies, also to full fine-tuning
        if method != "full":
            assert cfg.method.r == budget


@pytest.mark.parametrize("study,n_jobs", [("bbc", 1 + 3 * 5 + 3 * 3 + 4), ("mrpc", 1 + 3 * 5 + 3 * 5)])
def test_rank_study_jobs_compose_into_valid_configs(tmp_path, study, n_jobs):
    jobs = rank_sweep.study_jobs(study, tmp_path, [4, 8, 16, 32, 64], ["wandb.mode=disabled"])
    assert len(jobs) == n_jobs and len({j.out for j in jobs}) == n_jobs
    seen = set()
    for job in jobs:
        cfg = adarank.run.to_config(compose_config(job.overrides))
        m = cfg.method
        name = job.out.name
        if name == "full":
            assert m.name == "full"
            continue
        kind, r = name.split("_")[0], int(name.split("_")[1][1:])
        if kind == "blowup":
            assert m.name == "lora" and m.r == 16 and cfg.train.log_every == 1
            seen.add(("blowup", m.alpha / m.r, cfg.train.lr))
            continue
        assert m.name == kind and m.r == r
        if kind == "rslora":
            assert m.rslora and m.alpha == 16
        elif "_a" in name:  # the α/r sweep
            assert m.alpha / m.r == float(name.split("_a")[1])
        else:
            assert m.alpha == r  # α = r
    if study == "bbc":
        assert seen == {("blowup", 1.0, 1e-3), ("blowup", 1.0, 3e-3), ("blowup", 4.0, 1e-3), ("blowup", 4.0, 3e-3)}
