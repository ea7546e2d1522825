import json

import pytest

from adarank.studies.rank_study import (
    analyse,
    best_alpha_ratio,
    collect,
    main,
    plateau_rank,
    relative_gain,
    report,
)

RANKS = [2, 4, 8, 16, 32, 64]
# Perplexity that improves by >= 5% per doubling up to r = 16, then by < 1%.
SATURATING = {2: 30.0, 4: 24.0, 8: 20.0, 16: 18.0, 32: 17.9, 64: 17.85}


def test_plateau_saturating_curve():
    assert plateau_rank(list(SATURATING.items()), higher_is_better=False) == 16
    acc = [(r, 1 - v / 100) for r, v in SATURATING.items()]  # the same shape as an accuracy
    assert plateau_rank(acc, higher_is_better=True, tol=0.005) == 16


def test_plateau_monotone_curve_is_largest_rank():
    assert plateau_rank([(r, 100.0 / r) for r in RANKS], higher_is_better=False) == 64
    assert plateau_rank([(r, 0.5 + 0.05 * i) for i, r in enumerate(RANKS)], higher_is_better=True) == 64


def test_plateau_ignores_a_temporary_flat_step():
    pts = [(4, 20.0), (8, 19.99), (16, 15.0), (32, 14.99)]
    assert plateau_rank(pts, higher_is_better=False) == 16


def test_plateau_worse_after_best_and_seeds_averaged():
    pts = [(4, 20.0), (8, 15.0), (16, 15.5), (4, 22.0), (8, 15.2), (16, 15.3)]
    assert plateau_rank(pts, higher_is_better=False) == 8  # doubling past 8 only hurts
    assert plateau_rank([(8, 1.0)], higher_is_better=False) == 8
    with pytest.raises(ValueError):
        plateau_rank([], higher_is_better=False)


def test_plateau_tolerance_is_relative():
    assert relative_gain(20.0, 19.0, higher_is_better=False) == pytest.approx(0.05)
    pts = [(4, 20.0), (8, 19.0)]
    assert plateau_rank(pts, False, tol=0.049) == 8
    assert plateau_rank(pts, False, tol=0.051) == 4


def test_best_alpha_ratio():
    pts = [(0.5, 19.0), (1.0, 18.0), (2.0, 17.5), (4.0, 18.5), (2.0, 17.7)]
    assert best_alpha_ratio(pts, higher_is_better=False) == 2.0
    assert best_alpha_ratio(pts, higher_is_better=True) == 0.5
    assert best_alpha_ratio([(1.0, 3.0), (2.0, 3.0)], higher_is_better=True) == 1.0  # tie: the smaller


def _rec(method, r, alpha, ppl, seed=0, rslora=False, task="bbc"):
    return {"task": task, "method": method, "seed": seed, "metric": "ppl",
            "metrics": {"final": {"val/ppl": ppl}},
            "config": {"method": {"name": method, "r": r, "alpha": alpha, "rslora": rslora}}}


def _records():
    recs = [_rec("lora", r, r, v, seed=s) for r, v in SATURATING.items() for s in (0, 1)]
    recs += [_rec("rslora", r, 16, v * 0.98, rslora=True) for r, v in SATURATING.items()]
    recs += [_rec("lora", 16, a, v) for a, v in [(8, 18.6), (32, 17.6), (64, 17.8)]]  # α sweep at r = 16
    recs += [_rec("rslora", 16, a, v, rslora=True) for a, v in [(32, 17.0), (64, 17.4)]]
    recs += [_rec("adalora", r, 16, v - 0.3) for r, v in SATURATING.items() if r in (8, 16)]
    recs.append({"task": "bbc", "method": "lora", "seed": 0, "config": {"method": {"r": 4, "alpha": 4}}})  # no metric
    return recs


def test_collect_series():
    warnings = []
    pts = collect(_records(), "val/ppl", warnings.append)
    assert len(warnings) == 1 and "no numeric 'val/ppl'" in warnings[0]
    series = {p["series"] for p in pts}
    assert series == {"lora α/r=1", "lora α/r=0.5", "lora α/r=2", "lora α/r=4", "rslora α=16",
                      "rslora α=32", "rslora α=64", "adalora"}
    with pytest.raises(Exception, match="several tasks"):
        collect(_records() + [_rec("lora", 4, 4, 1.0, task="other")], "val/ppl")


def test_analyse():
    res = analyse(collect(_records(), "val/ppl"), higher_is_better=False)
    assert res["plateau_rank"] == {"lora α/r=1": 16, "rslora α=16": 16}
    assert res["alpha_rank"] == 16
    # lora at r = 16: α/r 0.5 → 18.6, 1 → 18.0 (mean of seeds), 2 → 17.6, 4 → 17.8
    # rslora at r = 16: α/r 1 (α = 16) → 17.64, 2 → 17.0, 4 → 17.4
    assert res["best_alpha_ratio"] == {"lora": 2.0, "rslora": 2.0}


def test_report_writes_files(tmp_path):
    res = report(_records(), tmp_path, "val/ppl", higher_is_better=False, warn=lambda m: None)
    assert res["plateau_rank"]["lora α/r=1"] == 16 and res["best_alpha_ratio"]["lora"] == 2.0
    for name in ("rank_study.md", "rank_study.json", "quality_vs_rank.png", "quality_vs_alpha.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    md = (tmp_path / "rank_study.md").read_text()
    assert "| lora α/r=1 | 16 |" in md and "Best α/r for lora at r = 16: **2**" in md
    assert "18 ± 0" in md  # two seeds averaged at r = 16
    assert json.loads((tmp_path / "rank_study.json").read_text())["alpha_rank"] == 16


def test_cli(tmp_path, capsys):
    for i, rec in enumerate(_records()):
        (tmp_path / "runs" / str(i)).mkdir(parents=True)
        (tmp_path / "runs" / str(i) / "results.json").write_text(json.dumps(rec))
    out = tmp_path / "out"
    assert main([str(tmp_path / "runs"), "--out", str(out), "--metric", "val/ppl", "--lower-is-better"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["plateau_rank"]["lora α/r=1"] == 16
    assert main([str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert main([str(tmp_path / "runs"), "--out", str(out), "--metric", "nope"]) == 2


def test_full_finetuning_is_a_reference_not_a_rank_point(tmp_path):
    full = {"task": "bbc", "method": "full", "seed": 0, "metrics": {"final": {"val/ppl": 16.5}},
            "config": {"method": {"name": "full", "r": 2, "alpha": 16}}}  # r and α are config leftovers
    recs = _records() + [full]
    assert all(p["method"] != "full" for p in collect(recs, "val/ppl"))
    res = report(recs, tmp_path, "val/ppl", higher_is_better=False, warn=lambda m: None)
    assert res["full_finetuning"] == [{"value": 16.5, "lr": None}]
    assert res["plateau_rank"]["lora α/r=1"] == 16  # no phantom r = 2 point from the full run
    assert "Full fine-tuning (reference, not a rank series; lr ?): 16.5." in (tmp_path / "rank_study.md").read_text()


def test_a_curve_still_improving_has_no_plateau_and_the_alpha_sweep_falls_back():
    recs = [_rec("lora", r, r, 100.0 / r) for r in (4, 8, 16, 32, 64)]  # halves with every doubling
    recs += [_rec("lora", 32, a, v) for a, v in [(16, 4.0), (64, 2.5), (128, 2.0)]]  # α sweep only at r = 32
    res = analyse(collect(recs, "val/ppl"), higher_is_better=False)
    assert res["plateau_rank"]["lora α/r=1"] == 64 and res["plateau_reached"]["lora α/r=1"] is False
    assert res["alpha_rank"] == 32 and "no α sweep at r = 64; the largest rank below it with one, r = 32" in res["alpha_rank_note"]
    assert res["best_alpha_ratio"] == {"lora": 4.0}
    flat = analyse(collect(_records(), "val/ppl"), higher_is_better=False)
    assert flat["plateau_reached"] == {"lora α/r=1": True, "rslora α=16": True} and flat["alpha_rank_note"] is None
