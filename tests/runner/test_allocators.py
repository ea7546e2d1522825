"""experiments/allocators: the grid (arms, per-family rates, counts, seeds), the finals waiting for their group's
rate, the timing stage, every arm composing into its config, and the tables on synthetic results.json files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import adarank.runner.cli

from e2e import compose_config

ROOT = Path(__file__).resolve().parents[2]
# the study's modules are named like allocation_controls' (plan, driver, tables): load them under their own names
sys.path.insert(0, str(ROOT / "experiments"))


def _load(name: str, path: Path):
    import importlib.util

    saved = sys.modules.pop("plan", None)
    sys.path.insert(0, str(path.parent))
    try:
        if name != "allocators_plan":
            sys.modules["plan"] = P
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(path.parent))
        sys.modules.pop("plan", None)
        if saved is not None:
            sys.modules["plan"] = saved


HERE = ROOT / "experiments" / "allocators"
P = _load("allocators_plan", HERE / "plan.py")
driver = _load("allocators_driver", HERE / "driver.py")
tables = _load("allocators_tables", HERE / "tables.py")


def test_the_grid_has_every_arm_task_budget_rate_and_seed(tmp_path):
    assert P.DEFAULT_ARMS == ("adalora", "eva", "sora", "increlora", "lora") and "sora_fixed" in P.ARMS
    assert {a: P.ARMS[a].lrs for a in ("adalora", "sora", "increlora", "sora_fixed")} == dict.fromkeys(
        ("adalora", "sora", "increlora", "sora_fixed"), (1e-3, 2e-3, 5e-3, 1e-2))  # the SVD adapters' grid
    assert P.ARMS["eva"].lrs == P.ARMS["lora"].lrs == (2e-4, 5e-4, 1e-3, 2e-3)
    plan = P.Plan(tmp_path)
    assert plan.planned() == {"select": 3 * 2 * 5 * 4, "final": 3 * 2 * 5 * 5, "timing": 0}
    first = plan.initial()
    assert len(first) == 120 and all(j.tags["seed"] == 100 and j.tags["stage"] == "select" for j in first)
    assert first[0].tags["group"] == ("sst2", "adalora", 2) and first[-1].tags["group"] == ("mrpc", "lora", 8)
    assert first[0].out == tmp_path / "select" / "sst2" / "adalora_r2" / "lr0.001_seed100"
    assert first[0].overrides == ["+experiment=allocators_sst2", "method=adalora", "method.r=2", "train.lr=0.001",
                                  "seed=100"]
    assert {(j.tags["group"][1], j.tags["lr"]) for j in first if j.tags["group"][1] == "eva"} == {
        ("eva", lr) for lr in P.LORA_LRS}
    assert plan.ready() == []  # nothing has ended: no finals
    fixed = P.make_job(tmp_path, "final", "cola", "sora_fixed", 8, 2e-3, 1)
    assert {"method=sora_fixed", "method.init_frac=0", "method.final_frac=0"} <= set(fixed.overrides)
    assert P.Plan(tmp_path, arms=[*P.DEFAULT_ARMS, "sora_fixed"], lrs=[1e-3]).planned()["select"] == 3 * 2 * 6
    for kwargs, msg in [({"arms": ["lora", "nope"]}, "--arms: unknown nope"),
                        ({"stages": ["select", "timing"]}, "timing runs alone"),
                        ({"stages": ["timing"], "tasks": ["sst2"]}, "--timing-tasks: mrpc not among --tasks"),
                        ({"stages": ["finals"]}, "--stages: unknown finals")]:
        with pytest.raises(ValueError, match=msg):
            P.Plan(tmp_path, **kwargs)


def _finish(job, val, diverged=False, **fields):
    """A synthetic results.json (what the report's load_row and the tables read) in the job's folder."""
    job.out.mkdir(parents=True, exist_ok=True)
    if diverged:
        (job.out / "diverged.json").write_text("{}")
        return
    task, arm, budget = job.tags["group"]
    rec = {"task": task, "method": P.ARMS[arm].method, "budget": budget, "seed": job.tags["seed"], "lr": job.tags["lr"],
           "value": 0.8, "metric": "f1", "metrics": {"best": {"val/f1": val}}, "config": {"method": {"name": arm}}}
    (job.out / "results.json").write_text(json.dumps(rec | fields))


def test_finals_wait_for_their_groups_rate_and_timing_runs_alone(tmp_path):
    plan = P.Plan(tmp_path, tasks=["mrpc"], budgets=[2], arms=["adalora", "lora"], seeds=[0, 1])
    first = plan.initial()
    by = {(j.tags["group"][1], j.tags["lr"]): j for j in first}
    assert len(first) == 8
    for lr in P.SVD_LRS[:-1]:  # adalora's last rate has not ended: no choice yet
        _finish(by[("adalora", lr)], {2e-3: 0.9}.get(lr, 0.7))
    for lr in P.LORA_LRS:
        _finish(by[("lora", lr)], 0.8, diverged=lr == 2e-3)  # a diverged rate ends but cannot win
    ready = plan.ready()
    assert sorted((j.tags["group"][1], j.tags["lr"], j.tags["seed"]) for j in ready) == [
        ("lora", 2e-4, 0), ("lora", 2e-4, 1)]  # tie on validation: the smaller rate
    assert ready[0].out == tmp_path / "final" / "mrpc" / "lora_r2" / "lr0.0002_seed0"
    _finish(by[("adalora", 1e-2)], 0.5)
    ready = plan.ready()
    assert sorted((j.tags["group"][1], j.tags["lr"], j.tags["seed"]) for j in ready) == [
        ("adalora", 2e-3, 0), ("adalora", 2e-3, 1)]
    assert plan.ready() == []  # nothing twice
    assert plan.state()["chosen"] == {"mrpc/adalora/2": 2e-3, "mrpc/lora/2": 2e-4}
    # a later call, timing alone: it chooses from the selection folders and runs one seed per arm and speed
    timing = P.Plan(tmp_path, tasks=["mrpc"], budgets=[2], arms=["adalora", "lora"], stages=["timing"]).initial()
    assert sorted((j.tags["stage"], j.tags["group"][1], j.tags["lr"], j.tags["seed"]) for j in timing) == [
        (f"timing_{sp}", arm, lr, 0) for sp in ("auto", "eager") for arm, lr in (("adalora", 2e-3), ("lora", 2e-4))]
    eager = next(j for j in timing if j.tags["stage"] == "timing_eager")
    assert "train.speed=eager" in eager.overrides and "timing_eager" in eager.out.parts


def test_every_arm_composes_into_its_config(tmp_path):
    for arm, a in P.ARMS.items():
        job = P.make_job(tmp_path, "timing_eager", "cola", arm, 8, 2e-3, 3, ["wandb.mode=disabled"])
        cfg = adarank.runner.cli.to_config(compose_config(job.overrides))
        m = cfg.method
        assert (cfg.experiment_name, cfg.task.name, cfg.model.name, m.name, m.r, cfg.train.lr, cfg.seed,
                cfg.train.speed) == ("allocators_cola", "cola", "minilm", a.method, 8, 2e-3, 3, "eager")
        # glue_minilm_cola's settings; sora_fixed keeps its own schedule (threshold from the first step on)
        want = (0.0, 0.0) if arm == "sora_fixed" else (0.1, 0.3)
        assert (cfg.train.epochs, m.init_frac, m.final_frac, m.delta_t, cfg.data.val_fraction) == (5, *want, 10, 0.1)
        assert P.arm_of({"method": {"name": m.name}}) == arm


def _layer_ranks(per_layer: list[list[int]]) -> dict[str, int]:
    kinds = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense"]
    return {f"bert.encoder.layer.{i}.{k}": r for i, row in enumerate(per_layer) for k, r in zip(kinds, row)}


def test_tables_pair_every_arm_with_lora_and_adalora_and_show_ranks_and_step_times(tmp_path, capsys):
    from scipy.stats import ttest_rel

    root = tmp_path / "study"
    values = {"adalora": [0.80, 0.82, 0.85], "sora": [0.78, 0.81, 0.80], "lora": [0.71, 0.69, 0.72],
              "eva": [0.81, 0.80, 0.86]}
    ranks = {"adalora": _layer_ranks([[4, 4, 0, 2, 2, 0], [0, 0, 4, 4, 2, 2]]),  # 24 in all: layer 0 half
             "sora": _layer_ranks([[1, 1, 1, 1, 1, 1], [3, 3, 3, 3, 3, 3]])}
    for arm, vs in values.items():
        for s, v in enumerate(vs):
            _finish(P.make_job(root, "final", "mrpc", arm, 2, 1e-3, s), 0.8, value=v, final_ranks=ranks.get(arm, {}),
                    steps_per_second=20.0, seconds=60.0, train_seconds=30.0, speed={"mode": "fused+graph"},
                    trainable_params_final=1000)
    _finish(P.make_job(root, "final", "mrpc", "lora", 2, 5e-3, 7), 0.8, value=0.1)  # not the chosen rate
    for arm, sps in (("lora", 50.0), ("adalora", 40.0)):
        _finish(P.make_job(root, "timing_eager", "mrpc", arm, 2, 1e-3, 0), 0.8, steps_per_second=sps, seconds=40.0,
                train_seconds=30.0, speed={"mode": "eager"})
    grids = {a: list(P.ARMS[a].lrs) for a in values}
    (root / "sweep_state.json").write_text(json.dumps({
        "grids": grids, "chosen": {f"mrpc/{a}/2": 1e-3 for a in values}}))
    assert tables.main([str(root), "--out", str(tmp_path / "out")]) == 0
    assert "lr 0.005 is not its group's chosen 0.001" in capsys.readouterr().err
    md = (tmp_path / "out" / "tables.md").read_text()

    p_sora = ttest_rel(values["sora"], values["lora"]).pvalue
    pairs = tables.paired_vs(tables.by_cell(tables.at_chosen_lr(
        [r | {"stage": "final"} for r in tables.load_runs(root)], {"mrpc/lora/2": 1e-3}, lambda m: None)), "lora")
    got = {p["a"]: p for p in pairs}
    assert list(got) == ["adalora", "eva", "sora"] and all(p["n"] == 3 and p["b"] == "lora" for p in pairs)
    assert got["sora"]["mean_diff"] == pytest.approx((0.07 + 0.12 + 0.08) / 3) and got["sora"]["ahead"]
    assert got["sora"]["p"] == pytest.approx(p_sora)
    ps = sorted(p["p"] for p in pairs)  # Holm: the smallest times 3, then max(previous, next times 2), ...
    assert sorted(p["p_holm"] for p in pairs) == pytest.approx(
        [3 * ps[0], max(3 * ps[0], 2 * ps[1]), max(3 * ps[0], 2 * ps[1], ps[2])])
    assert tables.holm([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06])
    assert f"| mrpc | 2 | sora - lora | 3 | +{(0.07 + 0.12 + 0.08) / 3:.4f} | {p_sora:.3g} |" in md
    assert "| mrpc | 2 | sora - adalora | 3 |" in md and "| mrpc | 2 | lora - adalora | 3 |" in md
    assert "| mrpc/adalora/2 | 0.001 (grid edge) | 0.001 0.002 0.005 0.01 |" in md
    assert "| mrpc/lora/2 | 0.001 | 0.0002 0.0005 0.001 0.002 |" in md
    # adalora: layer 0 has 12 of 24, q 4 of 24 (16.7%), v 4, ffn-out 2 (8.3%); 4 modules at rank 0
    assert "| mrpc | 2 | adalora | 3 | 2.00 | 4.0 | 50.0 | 50.0 | 16.7 | 16.7 | 16.7 | 25.0 | 16.7 | 8.3 |" in md
    assert "| mrpc | 2 | sora | 3 | 2.00 | 0.0 | 25.0 | 75.0 | 16.7 | 16.7 | 16.7 | 16.7 | 16.7 | 16.7 |" in md
    assert "| lora | 2 (fixed) |" not in md and "| mrpc | f1 | 2 | lora | 3 | 0.7067 ± 0.0153 | 1,000 | 2 (fixed) |" in md
    # 1000/40 = 25 ms against lora's 20: +25%; 10 s outside the steps
    assert "| timing_eager | mrpc | 2 | adalora | eager | 1 | 25.0 ± n/a | +25% | 10.0 |" in md
    assert "| final | mrpc | 2 | sora | fused+graph | 3 | 50.0 ± 0.0 | +0% | 30.0 |" in md
    tally = tables.tally(pairs)
    assert tally["sora"] == {"cells": 1, "ahead": 1, "behind": 0, "wins": int(got["sora"]["p_holm"] < 0.05),
                             "losses": 0}


def test_the_driver_runs_the_plan_resumably_and_refuses_bad_input(tmp_path, capsys):
    ran = []

    def fake_queue(queue, gpus, per_gpu, launch_until, kill_at, on_end):
        """jobqueue.run_queue's contract with a synthetic run per job: selection at 2e-3 wins for every arm."""
        ran.append(per_gpu)
        queue = [j for j in queue if not j.done()]
        while queue:
            job = queue.pop(0)
            _finish(job, 0.9 if job.tags["lr"] == 2e-3 else 0.7)
            queue += [j for j in on_end(job, "finished", 1.0) if not j.done()]
        return []

    root = tmp_path / "study"
    argv = ["--root", str(root), "--tasks", "mrpc", "--budgets", "8", "--seeds", "0", "1", "--arms", "sora", "eva",
            "--per-gpu", "6", "--", "train.max_steps=5"]
    assert driver.main(argv, queue_runner=fake_queue) == 0
    state = json.loads((root / "sweep_state.json").read_text())
    assert state["chosen"] == {"mrpc/eva/8": 2e-3, "mrpc/sora/8": 2e-3}
    assert len(state["jobs"]) == 8 + 4 and [e["stage"] for e in state["jobs"]].count("final") == 4
    job_log = state["jobs"][0]  # ARMS order: eva before sora
    assert job_log == {"stage": "select", "dir": "select/mrpc/eva_r8/lr0.0002_seed100", "outcome": "finished",
                       "seconds": 1.0}
    assert driver.main(argv, queue_runner=fake_queue) == 0  # everything done: nothing runs twice
    assert len(json.loads((root / "sweep_state.json").read_text())["jobs"]) == 12
    assert driver.main([*argv[:-2], "--stages", "timing", "--timing-speeds", "eager"], queue_runner=fake_queue) == 0
    assert ran == [6, 6, 1]  # the timing stage: one job per GPU
    assert sorted(p.parent.parent.name for p in (root / "timing_eager").rglob("results.json")) == ["eva_r8", "sora_r8"]
    assert driver.main(["--arms", "nope"]) == 2 and "unknown nope" in capsys.readouterr().err
