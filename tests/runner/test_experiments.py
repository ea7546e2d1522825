"""The sweep drivers in experiments/: the job queue, the GLUE stages, the rank-study job list.

The queue runs stand-in commands (a line of Python that writes results.json) so it is tested in seconds; the
job lists are checked by composing every job's overrides into a typed config, as the runner would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import adarank.runner.cli

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import jobqueue
from e2e import compose_config


def _load(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
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
        cfg = adarank.runner.cli.to_config(compose_config(job.overrides))
        task, method, budget = job.tags["group"]
        assert (cfg.task.name, cfg.method.name, cfg.train.lr) == (task, method, 1e-4)
        assert cfg.method.lr is None  # the grid's lr applies, also to full fine-tuning
        if method != "full":
            assert cfg.method.r == budget


def _result(job, val, task="mrpc", method="adalora"):
    """A finished run with validation metric `val`, or a diverged one when `val` is None."""
    job.out.mkdir(parents=True, exist_ok=True)
    if val is None:
        (job.out / "diverged.json").write_text("{}")
        return
    budget = job.tags["group"][2]
    (job.out / "results.json").write_text(json.dumps(
        {"task": task, "method": method, "budget": budget, "seed": job.tags["seed"], "value": 0.8, "metric": "f1",
         "metrics": {"best": {"val/f1": val}}}))


glue_levers = _load("glue_levers", ROOT / "experiments" / "glue" / "levers.py")


def _study(root, cells, extra=()):
    """A lever study whose jobs are the sweep's own (make_job), as main() builds it."""
    def make(stage, task, method, budget, lr, seed, lever, folder):
        return glue_sweep.make_job(root, stage, task, method, budget, lr, seed, list(extra), lever=lever, folder=folder)
    return glue_levers.Levers(make, cells, 100, 101, glue_sweep.SEEDS)


def test_lever_rule_screens_then_confirms():
    levers = glue_levers
    default = {("a", 2): 0.80, ("a", 8): 0.80, ("b", 2): 0.50}
    screen = {
        "small_but_steady": levers.summarize(levers.gains({("a", 2): 0.81, ("a", 8): 0.81, ("b", 2): 0.49}, default)),
        "one_lucky_cell": levers.summarize(levers.gains({("a", 2): 0.95, ("a", 8): 0.79, ("b", 2): 0.49}, default)),
        "diverged_once": levers.summarize(levers.gains({("a", 2): 0.99, ("a", 8): None, ("b", 2): 0.99}, default)),
        "worse": levers.summarize(levers.gains({("a", 2): 0.70, ("a", 8): 0.70, ("b", 2): 0.40}, default)),
    }
    assert screen["small_but_steady"]["wins"] == 2 and screen["diverged_once"]["complete"] is False
    # the lucky lever has the larger mean gain but wins one cell of three; the diverged one is out
    assert levers.candidate(screen) == "small_but_steady"
    assert levers.candidate({"worse": screen["worse"]}) is None
    # lower-is-better metrics flip the sign
    assert levers.gains({"c": 9.0}, {"c": 10.0}, lower=True) == [1.0]
    assert levers.gains({"c": 9.0, "d": 0.9}, {"c": 10.0, "d": 0.8}, lower={"c": True, "d": False}) == [1.0, 0.9 - 0.8]
    assert levers.confirmed(levers.summarize([0.01, -0.005, 0.0]))
    assert not levers.confirmed(levers.summarize([0.01, None, 0.02]))


def test_glue_lever_stage_screens_confirms_and_queues_finals_with_the_adopted_lever(tmp_path):
    L = glue_sweep.LEVERS
    selects = glue_sweep.select_jobs(tmp_path, ["mrpc"], [5e-4, 2e-3], 100, [])
    cells = [("mrpc", "adalora", 2), ("mrpc", "adalora", 8)]
    chosen = {c: 2e-3 for c in cells} | {("mrpc", "peft_adalora", 2): 5e-4, ("mrpc", "peft_adalora", 8): 2e-3}
    defaults = {c: next(j for j in selects if j.tags["group"] == c and j.tags["lr"] == 2e-3) for c in cells}
    for j in defaults.values():
        _result(j, 0.80)
    study = _study(tmp_path, cells, ["wandb.mode=disabled"])
    screen = study.step({cells[0]: 2e-3}, defaults)  # one cell chosen so far: its screen starts
    assert len(screen) == len(L) and {j.tags["lever"] for j in screen} == set(L)
    screen += study.step(chosen, defaults)
    assert len(screen) == 2 * len(L) and study.step(chosen, defaults) == []  # nothing twice, nothing early
    init_2x = next(j for j in screen if j.tags["lever"] == "init_2x")
    assert "method.init_ratio=2.0" in init_2x.overrides and "train.lr=0.002" in init_2x.overrides
    assert init_2x.out == tmp_path / "levers" / "mrpc" / "adalora_r2" / "init_2x" / "lr0.002_seed100"
    for j in screen:  # init_2x gains in both cells, orth_0 in one, the rest lose
        _result(j, {"init_2x": 0.83, "orth_0": 0.85 if j.tags["group"][2] == 2 else 0.70}.get(j.tags["lever"], 0.75))
    confirm = study.step(chosen, defaults)
    assert study.state["candidate"] == "init_2x"
    assert sorted((j.tags["lever"] or "", j.tags["seed"]) for j in confirm) == [("", 101)] * 2 + [("init_2x", 101)] * 2
    for j in confirm:
        _result(j, 0.82 if j.tags["lever"] else 0.81)
    not_yet = {g: lr for g, lr in chosen.items() if g != ("mrpc", "peft_adalora", 8)}
    assert study.step(not_yet, defaults) == []  # PEFT's r8 rate is not chosen yet: no finals for anyone yet
    assert study.state["adopted"] == "init_2x" and study.state["confirm"]["mean_gain"] > 0
    finals = study.step(chosen, defaults)
    # PEFT has an initial rank too, so both AdaLoRAs rerun their finals, each at its own learning rate
    assert len(finals) == 2 * (5 + 3)
    peft = [j for j in finals if j.tags["group"][1] == "peft_adalora" and j.tags["group"][2] == 2]
    assert {j.tags["lr"] for j in peft} == {5e-4} and all(j.out.parts[-4] == "final_init_2x" for j in peft)
    assert study.step(chosen, defaults) == []


def test_glue_lever_stage_adopts_nothing_when_the_second_seed_disagrees(tmp_path):
    selects = glue_sweep.select_jobs(tmp_path, ["mrpc"], [2e-3], 100, [])
    cells = [("mrpc", "adalora", 2), ("mrpc", "adalora", 8)]
    defaults = {c: next(j for j in selects if j.tags["group"] == c) for c in cells}
    for j in defaults.values():
        _result(j, 0.80)
    study = _study(tmp_path, cells)
    chosen = {c: 2e-3 for c in cells}
    for j in study.step(chosen, defaults):
        _result(j, 0.9 if j.tags["lever"] == "score_magnitude" else 0.7)
    for j in study.step(chosen, defaults):
        _result(j, 0.79 if j.tags["lever"] else 0.81)
    assert study.step(chosen, defaults) == []
    assert study.state["candidate"] == "score_magnitude" and study.state["adopted"] is None


def test_every_lever_composes_into_a_valid_config(tmp_path):
    for lever, overrides in glue_sweep.LEVERS.items():
        methods = ["adalora"] + (["peft_adalora"] if lever in glue_levers.PEFT_HAS else [])
        for method in methods:
            job = glue_sweep.make_job(tmp_path, "x", "cola", method, 8, 2e-3, 0, ["wandb.mode=disabled"], lever=lever)
            cfg = adarank.runner.cli.to_config(compose_config(job.overrides))
            for o in overrides:
                key, value = o.split("=")
                got = getattr(cfg.method, key.split(".")[1])
                assert str(got).lower() == value.lower() or float(got) == float(value), (lever, o, got)


def test_lever_table_is_recomputed_from_the_run_folders(tmp_path, capsys):
    levers = glue_levers
    cells = [("mrpc", "adalora", 2), ("mrpc", "adalora", 8)]
    for cell in cells:
        _result(glue_sweep.make_job(tmp_path, "select", "mrpc", "adalora", cell[2], 2e-3, 100, []), 0.80)
        for lever in glue_sweep.LEVERS:
            job = glue_sweep.make_job(tmp_path, "levers", "mrpc", "adalora", cell[2], 2e-3, 100, [],
                                      lever=lever, folder=lever)
            _result(job, None if lever == "orth_0.5" else 0.81 if lever == "init_2x" else 0.79)
    (tmp_path / "sweep_state.json").write_text(json.dumps(
        {"select_seed": 100, "chosen": {"mrpc/adalora/2": {"lr": 2e-3}, "mrpc/adalora/8": {"lr": 2e-3}},
         "levers": {"candidate": "init_2x", "confirm": {"mean_gain": -0.01}, "adopted": None}}))
    md = levers.render(tmp_path)
    assert "| default (value) | – | 0.8000 | 0.8000 |" in md
    assert "| init_2x | `method.init_ratio=2.0` | +1.00 | +1.00 | +1.00 | 2/2 |" in md
    assert "| orth_0.5 | `method.orth_weight=0.5` | div. | div. | – | 0/2 |" in md
    assert "(mrpc: f1)" in md
    assert "Candidate by the rule: **init_2x**. Second seed: mean gain -1.00 points. Adopted: **none**" in md
    state = json.loads((tmp_path / "sweep_state.json").read_text())
    state["levers"] = {"candidate": "init_2x", "confirm": {"mean_gain": 0.004}, "adopted": "init_2x"}
    (tmp_path / "sweep_state.json").write_text(json.dumps(state))
    assert ("Candidate by the rule: **init_2x**. Second seed: mean gain +0.40 points. Adopted: **init_2x**"
            in levers.render(tmp_path))
    state["levers"]["confirm"] = {"mean_gain": None}  # every confirmation run diverged
    (tmp_path / "sweep_state.json").write_text(json.dumps(state))
    assert "Second seed: no complete comparison." in levers.render(tmp_path)
    assert levers.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.md")]) == 2
    assert "sweep_state.json not found" in capsys.readouterr().err


def test_glue_finals_at_a_new_learning_rate_supersede_the_old_ones(tmp_path):
    old = tmp_path / "final" / "mrpc" / "lora_r2" / "lr0.0005_seed0"
    same = tmp_path / "final" / "mrpc" / "lora_r2" / "lr0.002_seed1"
    for d in (old, same):
        d.mkdir(parents=True)
        (d / "results.json").write_text("{}")
    said = []
    glue_sweep.supersede(tmp_path, "mrpc", "lora", 2, 2e-3, log=said.append)
    assert same.exists() and not old.exists()
    moved = tmp_path / "superseded" / "final" / "mrpc" / "lora_r2" / "lr0.0005_seed0"
    assert (moved / "results.json").exists() and len(said) == 1 and "moved final/mrpc/lora_r2/lr0.0005_seed0" in said[0]
    # the same rate chosen again later and superseded again: the second copy gets a suffix, nothing is lost
    old.mkdir(parents=True)
    (old / "results.json").write_text("{}")
    glue_sweep.supersede(tmp_path, "mrpc", "lora", 2, 2e-3, log=said.append)
    assert moved.exists() and (moved.parent / "lr0.0005_seed0.1" / "results.json").exists()


@pytest.mark.parametrize("study,n_jobs", [("bbc", 1 + 3 * 5 + 3 * 3 + 4), ("mrpc", 1 + 3 * 5 + 3 * 5)])
def test_rank_study_jobs_compose_into_valid_configs(tmp_path, study, n_jobs):
    jobs = rank_sweep.study_jobs(study, tmp_path, [4, 8, 16, 32, 64], ["wandb.mode=disabled"])
    assert len(jobs) == n_jobs and len({j.out for j in jobs}) == n_jobs
    seen = set()
    for job in jobs:
        cfg = adarank.runner.cli.to_config(compose_config(job.overrides))
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


def test_rank_study_extra_learning_rates_repeat_the_rank_sweeps(tmp_path):
    base = rank_sweep.study_jobs("bbc", tmp_path, [4, 8], [])
    jobs = rank_sweep.study_jobs("bbc", tmp_path, [4, 8], [], lrs=[1e-3, 3e-3])
    extra = [j for j in jobs if j not in base]
    assert len(extra) == 2 * 3 * 2 and len({j.out for j in jobs}) == len(jobs)
    for job in extra:
        lr_dir = job.out.parent.name
        assert job.out.parent.parent == tmp_path / "bbc" and lr_dir in ("lr0.001", "lr0.003")
        cfg = adarank.runner.cli.to_config(compose_config(job.overrides))
        assert cfg.train.lr == float(lr_dir[2:]) and cfg.method.name == job.out.name.split("_")[0]


#: The official scripts (QingruZhang/AdaLoRA NLU/scripts/run_debertav3_<task>.sh at f6968aa): train rows, epochs,
#: lr, lora_r, lora_alpha, init_warmup, final_warmup, mask_interval, max_seq_length, warm-up steps (MRPC: ratio 0.1),
#: weight decay.
SCRIPTS = {
    "sst2": (67349, 24, 8e-4, 2, 16, 6000, 22000, 100, 128, 1000, 0.01),
    "cola": (8551, 25, 8e-4, 3, 32, 800, 3500, 10, 64, 100, 0.0),
    "mrpc": (3668, 30, 1e-3, 2, 32, 600, 1800, 1, 320, 0.1, 0.01),
}


def test_paper_study_jobs_follow_the_official_scripts(tmp_path):
    from adarank.schedule import make_schedule
    from adarank.runner.train import total_steps

    study = glue_sweep.STUDIES["paper"]
    jobs = glue_sweep.select_jobs(tmp_path, ["sst2", "cola", "mrpc"], [0.5, 1, 2], 100, ["wandb.mode=disabled"], study)
    groups = {}
    for j in jobs:
        groups.setdefault(j.tags["group"], []).append(j.tags["lr"])
    for task, (rows, epochs, lr, r_init, alpha, t_i, t_f, dt, max_len, warm, wd) in SCRIPTS.items():
        fixed = [1, 2] + ([3] if r_init == 3 else [])  # kept parameters matched (r=1), and those at the start
        assert {g[1:] for g in groups if g[0] == task} == {("full", 1), ("adalora", 1), ("peft_adalora", 1),
                                                            *{(m, b) for m in ("lora", "rslora") for b in fixed}}
        assert groups[(task, "adalora", 1)] == [lr / 2, lr, 2 * lr] and groups[(task, "full", 1)] == [2e-5, 5e-5, 1e-4]
        T_script = rows // 32 + (rows % 32 > 0)
        T_script *= epochs
        for j in (j for j in jobs if j.tags["group"][0] == task and j.tags["lr"] == groups[j.tags["group"]][1]):
            cfg = adarank.runner.cli.to_config(compose_config(j.overrides))  # one lr per group: composing is slow
            _, method, budget = j.tags["group"]
            assert (cfg.model.name, cfg.task.name, cfg.train.lr, cfg.method.lr) == ("mpnet_base", task, j.tags["lr"], None)
            if method == "full":
                continue
            assert (cfg.method.r, cfg.method.alpha, cfg.task.max_length, cfg.train.batch_size) == (budget, alpha, max_len, 32)
            assert (cfg.train.weight_decay, cfg.method.orth_weight, cfg.method.beta1, cfg.method.beta2) == (wd, 0.1, 0.85, 0.85)
            assert cfg.method.init_rank == r_init
        # the schedule as fractions of T, to the 3 digits the experiment files give
        cfg = adarank.runner.cli.to_config(compose_config([f"+experiment=glue_paper_{task}"]))
        n_train = rows - round(rows * cfg.data.val_fraction)
        T = total_steps(n_train // 32 + (n_train % 32 > 0), cfg.train.epochs, 1, None)
        sched = make_schedule(T, cfg.method.init_frac, cfg.method.final_frac, cfg.method.delta_t)
        assert abs(cfg.method.init_frac - t_i / T_script) < 5e-4 and abs(cfg.method.final_frac - t_f / T_script) < 5e-4
        assert abs(cfg.train.warmup_frac - (warm if warm < 1 else warm / T_script)) < 0.001
        events, events_script = (T - sched.t_init - sched.t_final) / sched.delta_t, (T_script - t_i - t_f) / dt
        if task == "sst2":  # 3 of the script's 24 epochs; delta_t shrinks with T
            assert cfg.train.epochs == 3 and abs(events / events_script - 1) < 0.05
        else:  # the script's length; only the validation carve shortens T
            assert cfg.train.epochs == epochs and cfg.method.delta_t == dt and abs(T / T_script - 0.9) < 0.01
