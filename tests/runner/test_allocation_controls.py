"""experiments/allocation_controls: the grid, the pattern arms' dependencies on adalora's runs, and a tiny study
run end to end (in-process, on the GLUE fixtures) into its tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import adarank.runner.cli
import adarank.runner.train

from e2e import GLUE_FIXTURES, compose_config, one_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments" / "allocation_controls"))

import driver  # noqa: E402
import plan as P  # noqa: E402
import tables  # noqa: E402

HAS_SVD = (Path(adarank.runner.cli.CONF_DIR) / "method" / "svd.yaml").exists()  # method=svd: issue 19, part 3


def test_the_grid_has_every_arm_task_budget_and_seed(tmp_path):
    assert list(P.ARMS) == ["adalora", "svd", "lora_learned", "lora_shuffled", "lora_uniform", "lora_reversed",
                            "lora", "rslora"]
    assert P.ARMS["svd"].method == "svd" and not P.ARMS["svd"].pattern
    plan = P.Plan(tmp_path)
    assert plan.planned() == {"select": 3 * 2 * 8 * 5, "final": 3 * 2 * 8 * 5}
    first = plan.initial()
    # nothing has finished: only the arms that need no pattern start, adalora's runs first, SST-2 first
    assert len(first) == 3 * 2 * 4 * 5 and {j.tags["group"][1] for j in first} == {"adalora", "svd", "lora", "rslora"}
    assert first[0].tags["group"] == ("sst2", "adalora", 2) and all(j.tags["seed"] == 100 for j in first)
    assert plan.ready() == []
    assert first[0].out == tmp_path / "select" / "sst2" / "adalora_r2" / "lr0.0002_seed100"
    with pytest.raises(ValueError, match="lora_learned: needs pattern run"):
        P.make_job(tmp_path, "final", "sst2", "lora_learned", 2, 1e-3, 0, [])
    with pytest.raises(ValueError, match="pattern arms need adalora"):
        P.Plan(tmp_path, arms=["lora", "lora_shuffled"])


def _finish(job, val, diverged=False):
    job.out.mkdir(parents=True, exist_ok=True)
    if diverged:
        (job.out / "diverged.json").write_text("{}")
        return
    task, _, budget = job.tags["group"]
    (job.out / "results.json").write_text(json.dumps({"task": task, "method": "x", "budget": budget, "seed": job.tags["seed"],
                                                      "value": 0.8, "metric": "f1", "metrics": {"best": {"val/f1": val}}}))


def test_pattern_arms_wait_for_the_matching_adalora_run(tmp_path):
    plan = P.Plan(tmp_path, tasks=["mrpc"], budgets=[2], lrs=[5e-4, 2e-3], seeds=[0, 1])
    first = plan.initial()
    for j in first:
        _finish(j, {5e-4: 0.7, 2e-3: 0.9}[j.tags["lr"]] if j.tags["group"][1] == "adalora" else 0.8)
    ready = plan.ready()
    src = tmp_path / "select" / "mrpc" / "adalora_r2" / "lr0.002_seed100"  # adalora's chosen rate
    selects = [j for j in ready if j.tags["stage"] == "select"]
    assert len(selects) == 4 * 2 and all(j.tags["pattern"] == str(src) for j in selects)
    shuffled = next(j for j in selects if j.tags["group"][1] == "lora_shuffled")
    assert {"method=lora", f"method.rank_pattern={src}", "method.rank_pattern_transform=shuffle",
            "method.rank_pattern_seed=100"} <= set(shuffled.overrides)
    finals = [j for j in ready if j.tags["stage"] == "final"]
    assert sorted((j.tags["group"][1], j.tags["lr"], j.tags["seed"]) for j in finals) == sorted(
        [("adalora", 2e-3, s) for s in (0, 1)] + [(a, 5e-4, s) for a in ("svd", "lora", "rslora") for s in (0, 1)])
    assert plan.ready() == []  # nothing twice
    for j in selects:
        _finish(j, 0.8 if j.tags["lr"] == 5e-4 else 0.6)
    assert plan.ready() == []  # the pattern arms' rates are chosen, but no adalora final has ended
    ada = {j.tags["seed"]: j for j in finals if j.tags["group"][1] == "adalora"}
    _finish(ada[0], 0.9)
    _finish(ada[1], None, diverged=True)
    pattern_finals = plan.ready()
    assert sorted((j.tags["group"][1], j.tags["seed"]) for j in pattern_finals) == [
        (a, 0) for a in ("lora_learned", "lora_reversed", "lora_shuffled", "lora_uniform")]
    assert all(j.tags["pattern"] == str(ada[0].out) and j.tags["lr"] == 5e-4 for j in pattern_finals)
    assert len(plan.left_out) == 4 and all("diverged" in why for why in plan.left_out.values())
    assert plan.state()["chosen"]["mrpc/adalora/2"] == 2e-3


def test_every_arm_composes_into_its_config(tmp_path):
    pattern = tmp_path / "final" / "cola" / "adalora_r8" / "lr0.002_seed3"
    for arm, a in P.ARMS.items():
        if arm == "svd" and not HAS_SVD:
            continue  # conf/method/svd.yaml comes with issue 19's part 3 (another branch)
        job = P.make_job(tmp_path, "final", "cola", arm, 8, 2e-3, 3, ["wandb.mode=disabled"], pattern if a.pattern else None)
        cfg = adarank.runner.cli.to_config(compose_config(job.overrides))
        m = cfg.method
        assert (cfg.experiment_name, cfg.task.name, cfg.model.name, m.name, m.r, cfg.train.lr, cfg.seed) == (
            "allocation_controls_cola", "cola", "minilm", a.method, 8, 2e-3, 3)
        assert (m.rank_pattern, m.rank_pattern_transform) == ((str(pattern), a.transform) if a.pattern else (None, None))
        assert (cfg.train.epochs, cfg.method.final_frac, cfg.data.val_fraction) == (5, 0.3, 0.1)  # glue_minilm_cola's
        from dataclasses import asdict
        assert P.arm_of(asdict(cfg)) == arm


def test_paired_tests_per_question_and_only_the_chosen_rate():
    from scipy.stats import ttest_rel

    values = {"lora_learned": [0.80, 0.82, 0.85], "lora_shuffled": [0.78, 0.81, 0.80], "svd": [0.7, 0.7, 0.7],
              "lora": [0.71, 0.69, 0.72]}
    rows = [{"task": "mrpc", "budget": 2, "arm": arm, "seed": s, "value": v, "lr": 1e-3, "path": f"{arm}{s}"}
            for arm, vs in values.items() for s, v in enumerate(vs)]
    rows.append({**rows[0], "seed": 9, "lr": 5e-3, "path": "stale"})  # a run at a rate no longer chosen
    said = []
    kept = tables.at_chosen_lr(rows, {"mrpc/lora_learned/2": 1e-3}, said.append)
    assert len(kept) == 12 and len(said) == 1 and "stale: lr 0.005 is not its group's chosen 0.001" in said[0]
    got = {(p["a"], p["b"]): p for p in tables.paired(tables.by_cell(kept))}
    assert set(got) == {("lora_learned", "lora_shuffled"), ("svd", "lora")}  # only arms that ran
    learned = got[("lora_learned", "lora_shuffled")]
    assert learned["question"] == "allocation" and learned["n"] == 3
    assert learned["mean_diff"] == pytest.approx((0.02 + 0.01 + 0.05) / 3)
    assert learned["p"] == pytest.approx(ttest_rel(values["lora_learned"], values["lora_shuffled"]).pvalue)
    assert got[("svd", "lora")]["question"] == "parameterisation"


def _in_process(queue, gpus, per_gpu, launch_until, kill_at, on_end):
    """jobqueue.run_queue's contract, one job at a time in this process (a subprocess per run costs seconds)."""
    queue = [j for j in queue if not j.done()]
    while queue:
        job = queue.pop(0)
        cfg = adarank.runner.cli.to_config(compose_config(job.overrides))
        adarank.runner.train.train(cfg, str(job.out), log=lambda *_: None)
        queue += [j for j in on_end(job, "finished", 0.0) if not j.done()]
    return []


@pytest.mark.usefixtures("one_thread")
def test_a_tiny_study_runs_end_to_end_into_its_tables(tmp_path, capsys):
    root = tmp_path / "study"
    fast = ["model=tiny_random", "train.max_steps=10", "train.batch_size=8", f"data.dir={GLUE_FIXTURES}",
            "data.val_fraction=0.5", "data.max_train_samples=64", "data.max_eval_samples=32", "method.delta_t=2"]
    argv = ["--root", str(root), "--tasks", "mrpc", "--budgets", "2", "--lrs", "2e-3", "--seeds", "0",
            "--arms", "adalora", "lora_learned", "--stages", "final", "--", *fast]
    # the selection as an earlier call left it (its choice is tested above): the final stage's two runs are real
    for arm in ("adalora", "lora_learned"):
        _finish(P.make_job(root, "select", "mrpc", arm, 2, 2e-3, 100, [], Path("x") if arm != "adalora" else None), 0.8)
    assert driver.main(argv, queue_runner=_in_process) == 0
    ada = root / "final" / "mrpc" / "adalora_r2" / "lr0.002_seed0" / "results.json"
    learned = json.loads((root / "final" / "mrpc" / "lora_learned_r2" / "lr0.002_seed0" / "results.json").read_text())
    assert learned["config"]["method"]["rank_pattern"] == str(ada.parent)  # the same seed's adalora run
    assert learned["allocation_events"] is None and learned["kept_triplets"] is None  # a fixed-rank run has none
    assert json.loads(ada.read_text())["allocation_events"]["steps"]
    state = json.loads((root / "sweep_state.json").read_text())
    assert [e["dir"] for e in state["jobs"]] == ["final/mrpc/adalora_r2/lr0.002_seed0",
                                                  "final/mrpc/lora_learned_r2/lr0.002_seed0"]  # in dependency order
    assert state["left_out"] == {} and state["chosen"] == {"mrpc/adalora/2": 2e-3, "mrpc/lora_learned/2": 2e-3}
    assert driver.main(argv, queue_runner=_in_process) == 0  # a second call finds everything done
    assert len(json.loads((root / "sweep_state.json").read_text())["jobs"]) == 2

    assert tables.main([str(root), "--out", str(tmp_path / "out"), "--draws", "5"]) == 0
    md = (tmp_path / "out" / "tables.md").read_text()
    assert "| mrpc | 2 | all of it, same final ranks | adalora - lora_learned | 1 |" in md
    assert "| mrpc/adalora/2 | 0.002 |" in md and "| mrpc | 2 | 1 | n/a |" in md  # one seed: no agreement yet
    assert driver.main(["--arms", "nope"]) == 2 and "unknown nope" in capsys.readouterr().err
