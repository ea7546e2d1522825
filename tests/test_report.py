import csv
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ttest_rel

from adarank.report import main, paired_differences, paired_test

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRIC = {"rte": "accuracy", "cola": "matthews", "mrpc": "f1"}
NOISE = {0: 0.0, 1: 0.013, 2: -0.007}


def _write(root: Path, task, method, budget, seed, value, best=None, sub=""):
    run = root / sub / f"{task}-{method}-{budget}-s{seed}"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "experiment": "glue", "task": task, "method": method, "model": "tiny", "budget": budget, "seed": seed,
        "metric": METRIC[task], "value": value, "best_value": value + 0.001 if best is None else best,
        "metrics": {"final": {}, "best": {}, "best_step": 3}, "trainable_params": 100 * (budget or 50),
        "trainable_share": 0.01, "steps": 30, "seconds": 1.5, "final_ranks": {}, "budget_curve": [],
        "config": {}, "git_sha": None, "versions": {}, "device": "cpu",
    }))


@pytest.fixture
def tree(tmp_path):
    """Runs with known values; returns (root, {(task, method, budget): {seed: value}})."""
    root, truth = tmp_path / "runs", {}

    def add(task, method, budget, seed, value):
        _write(root, task, method, budget, seed, value)
        truth.setdefault((task, method, budget), {})[seed] = value

    gain = {"lora": 0.0, "adalora": 0.02, "peft_adalora": 0.02}
    for task, base in (("rte", 0.6), ("cola", 0.4)):
        for seed in range(3):
            add(task, "full", None, seed, base + 0.1 + NOISE[seed] / 2)
            for budget in (2, 8):
                add(task, "lora", budget, seed, base + gain["lora"] + budget / 100 + NOISE[seed])
                add(task, "adalora", budget, seed, base + 0.02 + budget / 100 + NOISE[seed] * 0.5 + seed / 1000)
                # A constant shift from adalora: the paired t-test is undefined.
                add(task, "peft_adalora", budget, seed, truth[(task, "adalora", budget)][seed] - 0.005)
    add("rte", "rslora", 8, 0, 0.7)  # one seed: std and p are n/a
    for seed in range(2):  # mrpc lacks most methods, so the task average must leave it out
        add("mrpc", "adalora", 8, seed, 0.85 + seed / 100)
    return root, truth


def _run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _row(md: str, *cells: str) -> str:
    """The one markdown table line that starts with ``cells``."""
    prefix = "| " + " | ".join(cells) + " |"
    hits = [line for line in md.splitlines() if line.startswith(prefix)]
    assert len(hits) == 1, (prefix, hits)
    return hits[0]


def test_csv_has_every_run_and_the_columns(tree, tmp_path, capsys):
    root, truth = tree
    out = tmp_path / "report"
    code, stdout, err = _run([root, "--out", out], capsys)
    assert code == 0 and err == ""
    assert "summary.md" in stdout
    with open(out / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["task", "method", "budget", "seed", "metric", "value", "best_value",
                             "trainable_params", "steps", "seconds"]
    assert len(rows) == sum(len(v) for v in truth.values())
    full = [r for r in rows if r["method"] == "full" and r["task"] == "rte" and r["seed"] == "1"]
    assert full[0]["budget"] == "" and float(full[0]["value"]) == truth[("rte", "full", None)][1]
    assert full[0]["metric"] == "accuracy" and full[0]["trainable_params"] == "5000"
    # Sorted by task, then method in the canonical order, then budget and seed.
    assert [r["method"] for r in rows if r["task"] == "cola" and r["seed"] == "0"] == \
        ["full", "lora", "lora", "adalora", "adalora", "peft_adalora", "peft_adalora"]
    for task in ("rte", "cola", "mrpc"):
        assert (out / f"metric_vs_budget_{task}.png").read_bytes()[:8] == PNG_MAGIC


def test_summary_means_averages_and_paired_tests(tree, tmp_path, capsys):
    root, truth = tree
    assert _run([root, "--out", tmp_path / "o"], capsys)[0] == 0
    md = (tmp_path / "o" / "summary.md").read_text()

    # (a) mean ± sample std with n
    v = list(truth[("rte", "lora", 8)].values())
    assert _row(md, "rte", "accuracy", "lora", "8", "3").endswith(f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f} |")
    assert _row(md, "rte", "accuracy", "full", "-", "3")
    assert _row(md, "rte", "accuracy", "rslora", "8", "1").endswith("0.7000 ± n/a |")

    # (b) average of per-task means over the tasks every (method, budget) has
    assert "has: rte. Left out: cola, mrpc." in md  # rslora only ran rte, mrpc lacks most methods
    assert _row(md, "adalora", "8").endswith(f"{np.mean(list(truth[('rte', 'adalora', 8)].values())):.4f} |")

    # (c) paired differences against scipy
    for task, budget, other, other_budget in [("rte", 8, "lora", 8), ("cola", 2, "lora", 2),
                                              ("cola", 2, "full", None), ("rte", 8, "full", None)]:
        a, b = truth[(task, "adalora", budget)], truth[(task, other, other_budget)]
        a, b = [a[s] for s in sorted(a)], [b[s] for s in sorted(b)]
        p = ttest_rel(a, b).pvalue
        line = _row(md, task, str(budget), f"adalora - {other}", "3")
        assert line.endswith(f"| {np.mean(np.subtract(a, b)):+.4f} | {p:.3g} |"), line
    assert _row(md, "rte", "8", "adalora - peft_adalora", "3").endswith("| +0.0050 | n/a |")  # constant shift
    assert _row(md, "rte", "8", "adalora - rslora", "1").endswith("| n/a |")  # one pair
    assert "| mrpc | 8 |" not in md.split("## Paired")[1]  # nothing to pair with
    assert "nan" not in md
    assert "![rte](metric_vs_budget_rte.png)" in md


def test_task_average_over_shared_tasks(tmp_path, capsys):
    for task, base in (("rte", 0.6), ("cola", 0.4), ("mrpc", 0.8)):
        for method, gain in (("lora", 0.0), ("adalora", 0.05)):
            for seed in range(2):
                _write(tmp_path / "r", task, method, 8, seed, base + gain + seed / 10)
    _write(tmp_path / "r", "mrpc", "lora", 4, 0, 0.5)  # lora@4 only on mrpc: the average uses mrpc only
    assert _run([tmp_path / "r"], capsys)[0] == 0  # --out defaults to the first DIR
    md = (tmp_path / "r" / "summary.md").read_text()
    assert "over 1 task(s) that every (method, budget) has: mrpc. Left out: cola, rte." in md
    assert _row(md, "adalora", "8").endswith("| 0.9000 |")

    (tmp_path / "r" / "mrpc-lora-4-s0" / "results.json").unlink()
    assert _run([tmp_path / "r"], capsys)[0] == 0
    md = (tmp_path / "r" / "summary.md").read_text()
    assert "has: cola, mrpc, rte." in md and "Left out" not in md
    assert _row(md, "lora", "8").endswith(f"| {np.mean([0.65, 0.45, 0.85]):.4f} |")


def test_best_value_metric(tree, tmp_path, capsys):
    root, truth = tree
    assert _run([root, "--out", tmp_path / "o", "--metric", "best_value"], capsys)[0] == 0
    md = (tmp_path / "o" / "summary.md").read_text()
    v = [x + 0.001 for x in truth[("cola", "adalora", 2)].values()]
    assert _row(md, "cola", "matthews", "adalora", "2", "3").endswith(f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f} |")
    assert "`best_value`" in md


def test_duplicates_warn_and_keep_last_by_path(tmp_path, capsys):
    _write(tmp_path, "rte", "lora", 8, 0, 0.5, sub="a")
    _write(tmp_path, "rte", "lora", 8, 0, 0.9, sub="b")
    _write(tmp_path, "rte", "lora", 8, 1, 0.7, sub="b")
    code, _, err = _run([tmp_path / "a", tmp_path / "b", tmp_path, "--out", tmp_path / "o"], capsys)
    assert code == 0
    warnings = err.strip().splitlines()
    assert len(warnings) == 1  # overlapping DIRs list the same files twice: not duplicates
    assert "duplicate" in warnings[0] and "seed=0" in warnings[0] and str(tmp_path / "b") in warnings[0]
    with open(tmp_path / "o" / "runs.csv", newline="") as f:
        assert [float(r["value"]) for r in csv.DictReader(f)] == [0.9, 0.7]


def test_bad_files_are_skipped_with_a_warning(tmp_path, capsys):
    _write(tmp_path, "rte", "lora", 8, 0, 0.5)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "results.json").write_text("{not json")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "results.json").write_text(json.dumps({"task": "rte", "method": "lora"}))
    code, _, err = _run([tmp_path], capsys)
    assert code == 0
    assert len(err.splitlines()) == 2 and "missing seed, value" in err and "broken" in err


def test_missing_or_empty_dir_exits_2(tmp_path, capsys):
    code, out, err = _run([tmp_path / "nope"], capsys)
    assert code == 2 and err.strip() == f"error: {tmp_path / 'nope'}: no such directory"
    (tmp_path / "empty").mkdir()
    _write(tmp_path, "rte", "lora", 8, 0, 0.5, sub="ok")
    code, out, err = _run([tmp_path / "ok", tmp_path / "empty"], capsys)
    assert code == 2 and err.strip() == f"error: {tmp_path / 'empty'}: no results.json found"
    assert not (tmp_path / "ok" / "summary.md").exists()  # nothing written on error


def test_works_without_pandas(tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` would raise
    root, _ = tree
    assert _run([root, "--out", tmp_path / "o"], capsys)[0] == 0


def test_module_entry_point_exits_2_without_traceback(tmp_path, capsys, monkeypatch):
    # runpy instead of a subprocess: a fresh interpreter would spend seconds importing torch.
    monkeypatch.setattr(sys, "argv", ["adarank.report", str(tmp_path / "nope")])
    with pytest.warns(RuntimeWarning, match="sys.modules"), pytest.raises(SystemExit) as exit_:
        runpy.run_module("adarank.report", run_name="__main__")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {tmp_path / 'nope'}: no such directory"]


def test_paired_test_matches_scipy_and_handles_degenerate_input():
    a, b = [0.5, 0.61, 0.7, 0.66], [0.45, 0.6, 0.62, 0.66]
    assert paired_test(a, b) == pytest.approx(ttest_rel(a, b).pvalue)
    assert paired_test([0.5], [0.4]) is None
    assert paired_test([0.3, 0.6, 0.9], [0.2, 0.5, 0.8]) is None  # constant difference up to rounding


def test_pairs_without_the_reference_compare_every_method():
    groups = {("rte", "full", None): {0: 0.9, 1: 0.8}, ("rte", "lora", 4): {0: 0.7, 1: 0.6},
              ("rte", "rslora", 4): {0: 0.75, 2: 0.5}, ("rte", "lora", 8): {5: 0.1}}
    got = [(p["budget"], p["a"], p["b"], p["n"], round(p["mean_diff"], 6)) for p in paired_differences(groups)]
    assert got == [(4, "rslora", "lora", 1, 0.05), (4, "lora", "full", 2, -0.2), (4, "rslora", "full", 1, -0.15)]
