"""adarank.studies.norm_study: the α/r = 4 adapter-norm blow-up study, on synthetic runs."""

import json

import pytest

from adarank.studies.errors import StudyError
from adarank.studies.norm_study import (
    apply_overrides,
    blowup_indicators,
    claim_verdict,
    compare_ratios,
    load_runs,
    mean_curve,
    norm_groups,
    norm_report,
    run_from_diverged,
)
from adarank.studies.rank_study import main

STEPS = 100


def linear(scale):
    """norm/max grows steadily: scale · 0.01 · t (reaches scale at the end)."""
    return lambda t: scale * 0.01 * t


def rush(scale, by=10, top=2.0):
    """norm/max rushes to scale · top / 4 by step `by`, then stays."""
    return lambda t: scale * top / 4 * min(t, by) / by


def _norm_rec(ratio, lr, norm, seed=0, r=16, steps=STEPS, loss=2.0, ppl=10.0, method="lora", rslora=False,
              alpha_ratio=True):
    log = [{"step": t, "train/loss": loss - t / 1000, "train/lr": lr, "norm/mean": norm(t) / 2, "norm/max": norm(t)}
           for t in range(1, steps + 1)]
    method_cfg = {"name": method, "r": r, "alpha": ratio * r, "alpha_ratio": ratio if alpha_ratio else None,
                  "rslora": rslora, "lr": None}
    return {"task": "bbc", "method": method, "seed": seed, "metric": "ppl", "steps": steps,
            "metrics": {"final": {"val/ppl": ppl}}, "train_log": log,
            "config": {"method": method_cfg, "train": {"lr": lr}}}


def _write(folder, rec, name="results.json"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(rec))
    return folder / name


def _diverged(folder, overrides, step=37, log=None):
    path = _write(folder, {"error": f"loss is nan at step {step}; stopped. No checkpoint had been written yet",
                           "overrides": overrides}, "diverged.json")
    if log is not None:
        import torch

        torch.save({"history": {"log": log}, "step": log[-1]["step"]}, folder / "checkpoint.pt")
    return path


def _sweep(tmp_path, high_lr_norm=None):
    """α/r ∈ {1, 4} × lr ∈ {1e-4, 1e-3}: α/r = 1 grows linearly; α/r = 4 at lr 1e-3 rushes up early
    (or follows `high_lr_norm`); α/r = 4 at lr 1e-4 is the scale alone (4× the α/r = 1 curve). Two seeds each."""
    for seed in (0, 1):
        for lr in (1e-4, 1e-3):
            _write(tmp_path / "runs" / f"r1_{lr}_{seed}", _norm_rec(1.0, lr, linear(1 + seed), seed=seed))
            norm = (high_lr_norm or rush(4 * (1 + seed))) if lr == 1e-3 else linear(4 * (1 + seed))
            _write(tmp_path / "runs" / f"r4_{lr}_{seed}", _norm_rec(4.0, lr, norm, seed=seed, ppl=12.0))
    return tmp_path / "runs"


def test_blowup_indicators_on_known_curves():
    steady = [(t, linear(1)(t)) for t in range(1, 101)]
    ind = blowup_indicators(steady, total_steps=100, early=0.1)
    assert ind["early_step"] == 10 and ind["early"] == pytest.approx(0.1)
    assert ind["peak"] == pytest.approx(1.0) and ind["peak_step"] == 100 and ind["final"] == pytest.approx(1.0)
    assert ind["early_over_final"] == pytest.approx(0.1)
    assert ind["half_peak_step"] == 50 and ind["half_peak_frac"] == pytest.approx(0.5)

    # up to 8 by step 10, a spike at 20, then down to 4: early ÷ final = 2, half the peak reached at step 7
    spike = [(t, 8 * t / 10 if t <= 10 else 16.0 if t == 20 else 4.0) for t in range(1, 101)]
    ind = blowup_indicators(spike, total_steps=100, early=0.1)
    assert (ind["early"], ind["peak"], ind["peak_step"], ind["final"]) == (8.0, 16.0, 20, 4.0)
    assert ind["early_over_final"] == pytest.approx(2.0) and ind["half_peak_step"] == 10

    # nothing logged by 10% (logged every 50 steps), or no known length: no early point
    sparse = blowup_indicators([(50, 1.0), (100, 2.0)], total_steps=100)
    assert sparse["early"] is None and sparse["early_over_final"] is None and sparse["half_peak_frac"] == 0.5
    assert blowup_indicators(steady, total_steps=None)["early"] is None
    with pytest.raises(ValueError):
        blowup_indicators([], 100)


def test_mean_curve_over_seeds_and_a_truncated_seed():
    assert mean_curve([[(1, 1.0), (2, 2.0)], [(1, 3.0), (2, 6.0)]]) == [(1, 2.0), (2, 4.0)]
    # the second seed diverged after step 1: step 2 is the first seed's alone
    assert mean_curve([[(1, 1.0), (2, 2.0)], [(1, 5.0)]]) == [(1, 3.0), (2, 2.0)]
    assert mean_curve([]) == []


def test_grouping_labels_and_seed_average(tmp_path):
    runs = load_runs([str(_sweep(tmp_path))])
    groups = norm_groups(runs)
    assert [g["label"] for g in groups] == ["α/r=1, lr=0.0001", "α/r=1, lr=0.001", "α/r=4, lr=0.0001", "α/r=4, lr=0.001"]
    g = groups[0]
    assert g["runs"] == 2 and g["seeds"] == [0, 1] and g["diverged"] == 0 and g["total_steps"] == STEPS
    # seeds 0 and 1 reach 1 and 2: the mean curve reaches 1.5; norm/mean is half of norm/max
    assert g["norm_max"]["final"] == pytest.approx(1.5) and g["final_norm_mean"] == pytest.approx(0.75)
    assert g["final_train_loss"] == pytest.approx(1.9) and g["final_val"] == 10.0 and g["val_metric"] == "ppl"

    # α from alpha / r when alpha_ratio is null; several ranks put r in the label; rsLoRA is named
    more = [_norm_rec(2.0, 1e-3, linear(1), r=8, alpha_ratio=False), _norm_rec(1.0, 1e-3, linear(1), rslora=True)]
    for i, rec in enumerate(more):
        _write(tmp_path / "runs" / f"more{i}", rec)
    labels = [g["label"] for g in norm_groups(load_runs([str(tmp_path / "runs")]))]
    assert "α/r=2, lr=0.001, r=8" in labels and "rslora α/r=1, lr=0.001, r=16" in labels
    assert "α/r=4, lr=0.001, r=16" in labels


def test_comparison_and_verdict_on_a_known_sweep(tmp_path):
    groups = norm_groups(load_runs([str(_sweep(tmp_path))]))
    comps = {c["lr"]: c for c in compare_ratios(groups)}
    # lr 1e-3: α/r = 4 is at 2·(1+seed) by step 10 (mean 3), α/r = 1 at 0.1·(1+seed) (mean 0.15): 20×, 5× the scale
    assert comps[1e-3]["early_ratio"] == pytest.approx(20.0) and comps[1e-3]["beyond_scale"] == pytest.approx(5.0)
    assert comps[1e-3]["final_ratio"] == pytest.approx(2.0) and comps[1e-3]["blowup"] is True
    # lr 1e-4: exactly the scale, no blow-up
    assert comps[1e-4]["beyond_scale"] == pytest.approx(1.0) and comps[1e-4]["blowup"] is False
    v = claim_verdict(list(comps.values()))
    assert v["verdict"] == "supported"
    assert v["above"] == {"comparisons": 1, "tested": 1, "blowup": 1, "lrs": [1e-3]}
    assert v["at_or_below"]["blowup"] == 0 and v["at_or_below"]["tested"] == 1


def test_verdict_not_supported_when_the_norm_is_only_scaled(tmp_path):
    runs = load_runs([str(_sweep(tmp_path, high_lr_norm=linear(4)))])
    comps = compare_ratios(norm_groups(runs))
    assert [c["blowup"] for c in comps] == [False, False]
    assert claim_verdict(comps)["verdict"] == "not supported"
    assert claim_verdict([])["verdict"].startswith("not tested")


def test_apply_overrides():
    cfg = {"method": {"name": "lora", "r": 16, "alpha": 16.0, "alpha_ratio": None}, "train": {"lr": 1e-3}}
    out = apply_overrides(cfg, ["train.lr=0.003", "+method.alpha_ratio=4.0", "method.rslora=false", "seed=2",
                                "+experiment=rank_search_bbc_blowup", "~wandb"])
    assert out["train"]["lr"] == 0.003 and out["method"]["alpha_ratio"] == 4.0 and out["method"]["rslora"] is False
    assert out["seed"] == 2 and isinstance(out["seed"], int) and out["experiment"] == "rank_search_bbc_blowup"
    assert cfg["train"]["lr"] == 1e-3  # not mutated
    assert apply_overrides({}, ["method=rslora", "task=bbc"]) == {"method": {"name": "rslora"}, "task": {"name": "bbc"}}


def test_diverged_run_from_overrides_and_hydra_config(tmp_path):
    path = _diverged(tmp_path / "a", ["method=lora", "method.r=8", "train.lr=0.003", "method.alpha_ratio=4.0", "seed=1"])
    run = run_from_diverged(path)
    assert (run["kind"], run["r"], run["ratio"], run["lr"], run["seed"]) == ("lora", 8, 4.0, 0.003, 1)
    assert run["diverged"] and run["diverged_at"] == 37 and run["curves"]["norm/max"] == []

    # r and the method from .hydra/config.yaml (the experiment's values); lr and α/r from the sweep's overrides
    (tmp_path / "b" / ".hydra").mkdir(parents=True)
    (tmp_path / "b" / ".hydra" / "config.yaml").write_text(
        "seed: 0\ntask:\n  name: bbc\nmethod:\n  name: lora\n  r: 16\n  alpha: 16\n  alpha_ratio: 4.0\n"
        "  rslora: false\n  lr: null\ntrain:\n  lr: 1e-3\n")
    run = run_from_diverged(_diverged(tmp_path / "b", ["train.lr=0.003"]))
    assert (run["kind"], run["r"], run["ratio"], run["lr"], run["task"]) == ("lora", 16, 4.0, 0.003, "bbc")

    # only what is known: no lr anywhere → "?" in the label, the run is kept
    run = run_from_diverged(_diverged(tmp_path / "c", ["method.alpha_ratio=4.0"]))
    assert run["lr"] is None and run["ratio"] == 4.0

    # method.lr, when set, overrides train.lr
    run = run_from_diverged(_diverged(tmp_path / "d", ["train.lr=0.003", "method.lr=0.0005", "method.alpha_ratio=1"]))
    assert run["lr"] == 0.0005 and run["ratio"] == 1.0


def test_diverged_runs_are_rows_with_their_checkpoint_log(tmp_path):
    runs_dir = _sweep(tmp_path)
    # α/r = 4 at lr 3e-3 diverged at step 37; its last checkpoint (step 30) holds a log that rushes up
    log = [{"step": t, "train/loss": 2.0, "norm/mean": 1.0 * t, "norm/max": 2.0 * t} for t in range(1, 31)]
    _diverged(runs_dir / "r4_0.003_0", ["train.lr=0.003", "method.alpha_ratio=4.0", "method.r=16", "method=lora"],
              log=log)
    _write(runs_dir / "r1_0.003_0", _norm_rec(1.0, 3e-3, linear(1)))
    # a folder with both files was resumed and finished: counted once, as finished
    _diverged(runs_dir / "r1_0.001_0", ["train.lr=0.001", "method.alpha_ratio=1.0"])
    groups = {g["label"]: g for g in norm_groups(load_runs([str(runs_dir)]))}
    g = groups["α/r=4, lr=0.003"]
    assert g["diverged"] == 1 and g["diverged_at"] == [37] and g["runs"] == 1
    assert g["total_steps"] == STEPS  # the study's run length
    assert g["norm_max"]["early"] == 20.0 and g["norm_max"]["final"] == 60.0 and g["final_val"] is None
    assert groups["α/r=1, lr=0.001"]["diverged"] == 0 and groups["α/r=1, lr=0.001"]["runs"] == 2
    comp = {c["lr"]: c for c in compare_ratios(list(groups.values()))}[3e-3]
    assert comp["blowup"] is True and comp["why"] == "α/r=4 diverged" and comp["diverged_high"] == "1/1"
    assert comp["early_ratio"] == pytest.approx(200.0) and comp["final_ratio"] is None  # step 30 vs 100: not comparable


def test_norms_cli_writes_files(tmp_path, capsys):
    runs_dir = _sweep(tmp_path)
    _diverged(runs_dir / "div", ["train.lr=0.003", "method.alpha_ratio=4.0", "method=lora", "method.r=16"])
    out = tmp_path / "out"
    assert main(["--norms", str(runs_dir), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["verdict"] == "supported" and "α/r=4, lr=0.003" in printed["groups"]
    for name in ("norm_blowup.png", "norm_blowup.md", "norm_blowup.json"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "norm_blowup.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "norm_blowup.md").read_text()
    assert "Claim under test: LoRA with α/r = 4" in md
    assert "| α/r=4, lr=0.003 | 1 | yes (1/1, at step 37) |" in md
    assert "| α/r=1, lr=0.0001 | 2 | no | 100 | 0.15 | 1.5 (100) | 1.5 | 0.10 | 50% | 0.75 | 1.9 | 10 |" in md
    assert "final val/ppl |" in md
    assert "| 16 | 0.001 | yes | 20 | 5 | 2 |" in md  # r, lr, above 3e-4, early ratio, beyond scale, final ratio
    assert "norm/max at 10% of training at α/r = 4 is 20× that at α/r = 1 (5× the 4× of the scale alone)" in md
    assert "The claim is **supported**" in md
    data = json.loads((out / "norm_blowup.json").read_text())
    assert {g["label"]: g["diverged"] for g in data["groups"]}["α/r=4, lr=0.003"] == 1
    assert data["comparisons"][1]["beyond_scale"] == pytest.approx(5.0)
    assert "curves" not in data["groups"][0]


def test_norms_error_path(tmp_path, capsys):
    rec = _norm_rec(1.0, 1e-3, linear(1))
    del rec["train_log"]
    _write(tmp_path / "runs" / "a", rec)
    out = tmp_path / "out"
    assert main(["--norms", str(tmp_path / "runs"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "rank_study: no run has norm/max in its train_log"
    assert not out.exists()
    assert main(["--norms", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"rank_study: {tmp_path / 'missing'}: no such directory"
    (tmp_path / "empty").mkdir()
    assert main(["--norms", str(tmp_path / "empty"), "--out", str(out)]) == 2
    with pytest.raises(StudyError, match="several tasks"):
        norm_report(load_runs([str(_sweep(tmp_path))]) + [{**load_runs([str(tmp_path / "runs")])[0], "task": "x"}], out)


def test_its_own_cli_equals_rank_study_norms(tmp_path, capsys):
    from adarank.studies import norm_study

    runs_dir = _sweep(tmp_path)
    assert norm_study.main([str(runs_dir), "--out", str(tmp_path / "a")]) == 0
    own = json.loads(capsys.readouterr().out)
    assert main(["--norms", str(runs_dir), "--out", str(tmp_path / "b")]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == own["verdict"]
    assert (tmp_path / "a" / "norm_blowup.md").read_text() == (tmp_path / "b" / "norm_blowup.md").read_text()
    assert norm_study.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "c")]) == 2
