import csv
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import ttest_rel

import adarank.report  # noqa: F401 - the entry point is loaded, as when the tests imported from it (runpy warns)
from adarank.studies.report import (
    choose_lr,
    main,
    matrix_type,
    paired_differences,
    paired_test,
    rank_breakdown,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METRIC = {"rte": "accuracy", "cola": "matthews", "mrpc": "f1", "bbc": "ppl"}
NOISE = {0: 0.0, 1: 0.013, 2: -0.007}


def _write(root: Path, task, method, budget, seed, value, best=None, sub="", lr=None, val=None, method_lr=None,
           ranks=None, curve=None, model="tiny", config=None):
    """One run's results.json; ``lr`` is config.train.lr, ``val`` the carved-validation metric at the best step,
    ``config`` more config sections (merged into them); ``model=None`` leaves results.json's ``model`` out."""
    run = root / sub / (f"{task}-{method}-{budget}-s{seed}" + ("" if lr is None else f"-lr{lr}")
                        + ("" if model in ("tiny", None) else f"-{model}"))
    run.mkdir(parents=True)
    metric = METRIC[task]
    best_metrics = {} if val is None else {"step": 3, f"val/{metric}": val, f"validation/{metric}": value}
    cfg = {} if lr is None else {"train": {"lr": lr, "epochs": 3}, "method": {"name": method, "lr": method_lr}}
    for section, fields in (config or {}).items():
        cfg[section] = {**cfg.get(section, {}), **fields} if isinstance(fields, dict) else fields
    (run / "results.json").write_text(json.dumps({
        "experiment": "glue", "task": task, "method": method, "budget": budget, "seed": seed,
        **({} if model is None else {"model": model}),
        "metric": metric, "value": value, "best_value": value + 0.001 if best is None else best,
        "metrics": {"final": {}, "best": best_metrics, "best_step": 3}, "trainable_params": 100 * (budget or 50),
        "trainable_share": 0.01, "steps": 30, "seconds": 1.5, "final_ranks": ranks or {}, "budget_curve": curve or [],
        "config": cfg, "git_sha": None, "versions": {}, "device": "cpu",
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
                             "trainable_params", "steps", "seconds", "lr", "val_value", "selected"]
    assert len(rows) == sum(len(v) for v in truth.values())
    # One learning rate (unknown here) per group: every run is selected.
    assert {(r["lr"], r["val_value"], r["selected"]) for r in rows} == {("", "", "true")}
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
    assert "Learning rate chosen" not in md and "Where the rank went" not in md  # one lr, no adaptive ranks


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
    code, _, err = _run([tmp_path / "nope"], capsys)
    assert code == 2 and err.strip() == f"error: {tmp_path / 'nope'}: no such directory"
    (tmp_path / "empty").mkdir()
    _write(tmp_path, "rte", "lora", 8, 0, 0.5, sub="ok")
    code, _, err = _run([tmp_path / "ok", tmp_path / "empty"], capsys)
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


# ---- learning rate chosen on the validation split ----------------------------------------------

LRS = (1e-4, 5e-4, 1e-3)


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def lr_sweep(tmp_path):
    """rte: lora@8 at three lrs, where 5e-4 has the best mean val but 1e-3 the best dev; adalora@8 at one lr,
    full with method.lr overriding train.lr. Returns (root, {(method, lr): {seed: dev value}})."""
    root, dev = tmp_path / "runs", {}
    val_of = {1e-4: 0.70, 5e-4: 0.75, 1e-3: 0.72}  # mean val per lr
    dev_of = {1e-4: 0.60, 5e-4: 0.65, 1e-3: 0.90}  # 1e-3 wins on dev: it must not be chosen
    for seed in range(3):
        for lr in LRS:
            value = dev_of[lr] + NOISE[seed]
            _write(root, "rte", "lora", 8, seed, value, lr=lr, val=val_of[lr] + NOISE[seed])
            dev.setdefault(("lora", lr), {})[seed] = value
        value = 0.7 + seed / 100
        _write(root, "rte", "adalora", 8, seed, value, lr=1e-3, val=0.8)
        dev.setdefault(("adalora", 1e-3), {})[seed] = value
        _write(root, "rte", "full", None, seed, 0.8, lr=5e-4, method_lr=2e-5, val=0.8)
    return root, dev


def test_lr_is_chosen_by_mean_val_not_by_dev(lr_sweep, tmp_path, capsys):
    root, dev = lr_sweep
    out = tmp_path / "o"
    code, _, err = _run([root, "--out", out], capsys)
    assert code == 0 and err == ""  # one seed at several lrs is not a duplicate

    rows = _csv(out / "runs.csv")
    assert len(rows) == 15  # every run, selected or not
    lora = {(float(r["lr"]), int(r["seed"])): r for r in rows if r["method"] == "lora"}
    assert len(lora) == 9
    assert {k for k, r in lora.items() if r["selected"] == "true"} == {(5e-4, s) for s in range(3)}
    assert all(r["selected"] == "false" for k, r in lora.items() if k[0] != 5e-4)
    assert float(lora[(1e-3, 1)]["val_value"]) == pytest.approx(0.72 + NOISE[1])
    assert {r["lr"] for r in rows if r["method"] == "full"} == {"2e-05"}  # method.lr overrides train.lr
    assert all(r["selected"] == "true" for r in rows if r["method"] != "lora")

    md = (out / "summary.md").read_text()
    assert md.startswith("# adarank results\n\n15 runs, 9 of them at the learning rate chosen")
    table = md.split("## Learning rate chosen on the validation split")[1].split("\n## ")[0]
    chosen = [line for line in table.splitlines() if line.endswith("| ✓ |")]
    assert [line.split(" | ")[2:5] for line in chosen] == [["full", "-", "2e-05"], ["lora", "8", "0.0005"],
                                                            ["adalora", "8", "0.001"]]
    dev_mean = np.mean(list(dev[("lora", 1e-3)].values()))  # shown, but not used
    val_mean = np.mean([0.72 + NOISE[s] for s in range(3)])
    assert _row(table, "rte", "accuracy", "lora", "8", "0.001", "3/3", f"{val_mean:.4f}").endswith(
        f"| {dev_mean:.4f} |  |")

    # Tables use the chosen lr's runs only: three seeds, their mean; the paired test pairs them with adalora.
    v = list(dev[("lora", 5e-4)].values())
    assert _row(md, "rte", "accuracy", "lora", "8", "3", "0.0005").endswith(
        f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f} |")
    assert _row(md, "lora", "8").endswith(f"| {np.mean(v):.4f} |")  # the task average
    a = [dev[("adalora", 1e-3)][s] for s in range(3)]
    line = _row(md, "rte", "8", "adalora - lora", "3")
    assert line.endswith(f"| {np.mean(np.subtract(a, v)):+.4f} | {ttest_rel(a, v).pvalue:.3g} |"), line
    assert (out / "metric_vs_budget_rte.png").read_bytes()[:8] == PNG_MAGIC


def test_lr_ties_go_to_the_smaller_lr(tmp_path, capsys):
    # Equal means (up to rounding: 0.1 + 0.2 != 0.3) from different per-seed values.
    for seed, (a, b, c) in enumerate([(0.7, 0.8, 0.1 + 0.2), (0.8, 0.7, 0.3)]):
        _write(tmp_path, "rte", "lora", 8, seed, 0.5, lr=1e-3, val=a)
        _write(tmp_path, "rte", "lora", 8, seed, 0.9, lr=3e-4, val=b)
        _write(tmp_path, "cola", "lora", 8, seed, 0.5, lr=2e-4, val=c)
        _write(tmp_path, "cola", "lora", 8, seed, 0.9, lr=1e-4, val=0.3)
    assert _run([tmp_path, "--out", tmp_path / "o"], capsys)[0] == 0
    chosen = {(r["task"], r["lr"]) for r in _csv(tmp_path / "o" / "runs.csv") if r["selected"] == "true"}
    assert chosen == {("rte", "0.0003"), ("cola", "0.0001")}

    assert choose_lr({1e-3: 0.5, 1e-4: 0.5, 3e-4: 0.5}) == 1e-4
    assert choose_lr({1e-3: 0.6, 1e-4: 0.5}) == 1e-3
    assert choose_lr({1e-3: 0.6, 1e-4: 0.5}, lower=True) == 1e-4
    assert choose_lr({1e-3: None, 1e-4: float("nan"), 3e-4: 0.1}) == 3e-4  # without a val metric: not a candidate
    assert choose_lr({5e-4: None}) == 5e-4  # a single lr needs no val metric
    with pytest.raises(ValueError):
        choose_lr({1e-3: None, 1e-4: None})


def test_lr_for_perplexity_is_the_lowest_val(tmp_path, capsys):
    for seed in range(2):
        _write(tmp_path, "bbc", "lora", 8, seed, 30.0, lr=1e-4, val=20.0 + seed)
        _write(tmp_path, "bbc", "lora", 8, seed, 10.0, lr=1e-3, val=15.0 + seed)  # lower val: chosen
        _write(tmp_path, "bbc", "lora", 8, seed, 5.0, lr=3e-3, val=16.0 + seed)  # lowest dev: not chosen
    assert _run([tmp_path, "--out", tmp_path / "o"], capsys)[0] == 0
    chosen = {r["lr"] for r in _csv(tmp_path / "o" / "runs.csv") if r["selected"] == "true"}
    assert chosen == {"0.001"}
    md = (tmp_path / "o" / "summary.md").read_text()
    assert _row(md, "bbc", "ppl", "lora", "8", "2", "0.001").endswith("10.0000 ± 0.0000 |")


def test_several_lrs_without_val_metric_are_left_out(tmp_path, capsys):
    for lr in (1e-4, 1e-3):
        _write(tmp_path, "rte", "lora", 8, 0, 0.5, lr=lr)  # no val/accuracy in metrics.best
    _write(tmp_path, "rte", "adalora", 8, 0, 0.6, lr=1e-3)  # a single lr needs none
    code, _, err = _run([tmp_path, "--out", tmp_path / "o"], capsys)
    assert code == 0
    assert err.strip() == ("warning: task=rte method=lora budget=8 ran at learning rates 0.0001, 0.001 but no run "
                           "has a validation metric to choose by: left out")
    rows = _csv(tmp_path / "o" / "runs.csv")
    assert {(r["method"], r["selected"]) for r in rows} == {("lora", "false"), ("adalora", "true")}
    md = (tmp_path / "o" / "summary.md").read_text()
    assert "| rte | accuracy | lora | 8 | 0.001 | 0/1 | n/a | 0.5000 | no val metric: left out |" in md
    assert "| rte | accuracy | lora | 8 | 1 |" not in md


# ---- where the rank went, budget curves ------------------------------------------------------

BASE = {"q": 1, "k": 2, "v": 3, "attn-out": 4, "ffn-in": 5, "ffn-out": 6}
SUFFIX = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
          "attn-out": "attention.output.dense", "ffn-in": "intermediate.dense", "ffn-out": "output.dense"}


def _ranks(seed, prefix="", scale=1):
    """rank = (base of the type + 2 * layer + seed) * scale over two layers, and the pooler at rank 1."""
    ranks = {f"{prefix}bert.encoder.layer.{i}.{SUFFIX[t]}": (b + 2 * i + seed) * scale
             for i in range(2) for t, b in BASE.items()}
    return ranks | {f"{prefix}bert.pooler.dense": 1}


@pytest.mark.parametrize("name, expected", [
    ("bert.encoder.layer.3.attention.self.query", "q"),
    ("roberta.encoder.layer.0.attention.self.key", "k"),
    ("deberta.encoder.layer.11.attention.self.value_proj", "v"),
    ("bert.encoder.layer.3.attention.output.dense", "attn-out"),
    ("bert.encoder.layer.3.intermediate.dense", "ffn-in"),
    ("bert.encoder.layer.3.output.dense", "ffn-out"),
    ("base_model.model.bert.encoder.layer.3.output.dense", "ffn-out"),
    ("model.layers.2.self_attn.o_proj", "o_proj"),
    ("model.layers.2.mlp.gate_proj", "gate_proj"),
    ("transformer.h.1.mlp.c_fc", "mlp.c_fc"),
    ("bert.pooler.dense", "bert.pooler.dense"),
])
def test_matrix_type(name, expected):
    assert matrix_type(name) == expected


def test_rank_breakdown_halves():
    ranks = {f"model.layers.{i}.mlp.down_proj": float(i) for i in range(5)} | {"lm_head": 9.0}
    got = rank_breakdown(ranks)
    assert got["type"] == {"down_proj": 2.0, "lm_head": 9.0} and got["all"] == pytest.approx(19 / 6)
    assert got["bottom"] == 0.5 and got["top"] == 3.5  # layers 0-1 and 3-4; the middle layer 2 in neither
    assert rank_breakdown({"model.layers.0.mlp.up_proj": 4})["top"] is None


def test_where_the_rank_went_and_plots(tmp_path, capsys):
    curve = [[0, 84], [10, 60], [20, 26]]
    for seed in range(2):
        _write(tmp_path, "rte", "adalora", 2, seed, 0.7, lr=1e-3, val=0.8, ranks=_ranks(seed), curve=curve)
        # a worse lr whose ranks would change every mean if they were used
        _write(tmp_path, "rte", "adalora", 2, seed, 0.9, lr=1e-4, val=0.6, ranks=_ranks(seed, scale=10), curve=curve)
        # PEFT's prefix on one seed only: the module names must still match across seeds
        _write(tmp_path, "rte", "peft_adalora", 2, seed, 0.7, lr=1e-3, val=0.8,
               ranks=_ranks(seed, prefix="base_model.model." if seed else ""), curve=[[0, 84], [10, 60 + seed]])
        _write(tmp_path, "rte", "lora", 2, seed, 0.6, lr=1e-3, val=0.8)
    code, stdout, err = _run([tmp_path, "--out", tmp_path / "o"], capsys)
    assert code == 0 and err == ""
    assert "and 6 plot(s)" in stdout  # metric vs budget, 2 heatmaps, 2 budget curves, the seeds' agreement
    md = (tmp_path / "o" / "summary.md").read_text()
    section = md.split("## Where the rank went")[1].split("\n## ")[0]
    by_type, by_layer = section.split("### By layer")
    # Per type: mean over seeds (+0.5) and layers (+1) of base + 2 * layer + seed; all: (12 * 5 + 1) / 13.
    assert "| task | method | budget | lr | n seeds | all | q | k | v | attn-out | ffn-in | ffn-out | " \
           "bert.pooler.dense |" in by_type
    for method in ("adalora", "peft_adalora"):
        assert _row(by_type, "rte", method, "2", "0.001", "2") == \
            "| rte | " + method + " | 2 | 0.001 | 2 | 4.69 | 2.50 | 3.50 | 4.50 | 5.50 | 6.50 | 7.50 | 1.00 |"
        assert _row(by_layer, "rte", method, "2", "2") == \
            "| rte | " + method + " | 2 | 2 | 4.00 | 6.00 | 1.00 | 4.00 | 6.00 |"
    assert "| lora |" not in section  # no final ranks
    assert "| task | method | budget | n seeds | layer 0 | layer 1 | no layer | bottom | top |" in by_layer

    for kind in ("rank_heatmap", "budget_curve"):
        for method in ("adalora", "peft_adalora"):
            path = tmp_path / "o" / f"{kind}_rte_{method}_r2.png"
            assert path.read_bytes()[:8] == PNG_MAGIC
            assert f"({path.name})" in md
    assert not list((tmp_path / "o").glob("*_rte_lora_r2.png"))  # lora: no ranks, no curve


def test_diverged_runs_are_listed_not_summarised(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed in (0, 1):
        _write(root, "mrpc", "lora", 2, seed, 0.8 + seed / 100)
    bad = root / "mrpc-lora-2-lr" / "high"
    bad.mkdir(parents=True)
    (bad / "diverged.json").write_text(json.dumps({"error": "loss is nan at step 640; stopped",
                                                   "overrides": ["method=lora", "train.lr=0.002"]}))
    resumed = root / "mrpc-lora-2-s0"  # a diverged.json next to a finished run: resumed since, not diverged
    (resumed / "diverged.json").write_text(json.dumps({"error": "old"}))
    assert main([str(root), "--out", str(tmp_path / "out")]) == 0
    assert "1 diverged run(s)" in capsys.readouterr().err
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "## Diverged runs" in md and "loss is nan at step 640" in md and "train.lr=0.002" in md
    assert "| old |" not in md and md.count("mrpc-lora-2-lr") == 1
    rows = list(csv.DictReader((tmp_path / "out" / "runs.csv").open()))
    assert len(rows) == 2  # only finished runs are rows


# ---- runs of several models, and groups whose runs differ in their config ---------------------------


def test_runs_of_two_models_are_grouped_apart(tmp_path, capsys):
    # minilm ran lora only, tiny lora and adalora: tiny's adalora must be paired with tiny's lora, never minilm's
    for seed in range(2):
        _write(tmp_path, "rte", "lora", 8, seed, 0.80 + seed / 100, model="minilm")
        _write(tmp_path, "rte", "lora", 8, seed, 0.50 + seed / 100)
        _write(tmp_path, "rte", "adalora", 8, seed, 0.55 + seed / 50)
    code, _, err = _run([tmp_path, "--out", tmp_path / "o"], capsys)
    assert code == 0 and err == ""  # the same task, method, budget and seed of two models: not duplicates

    rows = _csv(tmp_path / "o" / "runs.csv")
    assert list(rows[0]) == ["task", "model", "method", "budget", "seed", "metric", "value", "best_value",
                             "trainable_params", "steps", "seconds", "lr", "val_value", "selected"]
    assert [(r["model"], r["method"], r["seed"]) for r in rows] == [
        ("minilm", "lora", "0"), ("minilm", "lora", "1"), ("tiny", "lora", "0"), ("tiny", "lora", "1"),
        ("tiny", "adalora", "0"), ("tiny", "adalora", "1")]

    md = (tmp_path / "o" / "summary.md").read_text()
    assert "They are of 2 models (minilm, tiny)" in md
    assert "| task | model | metric | method | budget | n | lr | mean ± std |" in md
    assert _row(md, "rte", "minilm", "accuracy", "lora", "8", "2").endswith("0.8050 ± 0.0071 |")
    assert _row(md, "rte", "tiny", "accuracy", "lora", "8", "2").endswith("0.5050 ± 0.0071 |")
    paired = md.split("## Paired differences")[1].split("\n## ")[0]
    p = ttest_rel([0.55, 0.57], [0.50, 0.51]).pvalue
    assert _row(paired, "rte", "tiny", "8", "adalora - lora", "2").endswith(f"| +0.0550 | {p:.3g} |")
    assert "minilm" not in paired  # minilm has one method: nothing to pair it with
    assert "every (model, method, budget) has: rte." in md
    assert _row(md, "minilm", "lora", "8").endswith("| 0.8050 |") and _row(md, "tiny", "lora", "8")
    assert (tmp_path / "o" / "metric_vs_budget_rte.png").read_bytes()[:8] == PNG_MAGIC


def test_two_models_have_their_own_lr_choice_rank_plots_and_warnings(tmp_path, capsys):
    for model in ("minilm", "tiny"):
        for seed in range(2):
            _write(tmp_path, "rte", "adalora", 2, seed, 0.7, lr=1e-3, val=0.8 if model == "tiny" else 0.6,
                   ranks=_ranks(seed), curve=[[0, 84], [10, 26]], model=model)
            _write(tmp_path, "rte", "adalora", 2, seed, 0.7, lr=1e-4, val=0.7, ranks=_ranks(seed), model=model)
        _write(tmp_path, "rte", "lora", 2, 0, 0.5, lr=1e-4, model=model)  # several lrs, no val metric
        _write(tmp_path, "rte", "lora", 2, 0, 0.5, lr=1e-3, model=model)
    code, _, err = _run([tmp_path, "--out", tmp_path / "o"], capsys)
    assert code == 0
    assert err.splitlines() == [f"warning: task=rte model={m} method=lora budget=2 ran at learning rates 0.0001, "
                                "0.001 but no run has a validation metric to choose by: left out"
                                for m in ("minilm", "tiny")]
    chosen = {(r["model"], r["lr"]) for r in _csv(tmp_path / "o" / "runs.csv")
              if r["selected"] == "true" and r["method"] == "adalora"}
    assert chosen == {("minilm", "0.0001"), ("tiny", "0.001")}  # each model's own best val
    md = (tmp_path / "o" / "summary.md").read_text()
    table = md.split("## Learning rate chosen")[1].split("\n## ")[0]
    assert _row(table, "rte", "tiny", "accuracy", "adalora", "2", "0.001", "2/2", "0.8000").endswith("| ✓ |")
    by_type = md.split("## Where the rank went")[1].split("### By layer")[0]
    assert _row(by_type, "rte", "minilm", "adalora", "2", "0.0001", "2") and _row(by_type, "rte", "tiny", "adalora", "2")
    for kind, models in (("rank_heatmap", ("minilm", "tiny")), ("budget_curve", ("tiny",))):
        for model in models:
            assert (tmp_path / "o" / f"{kind}_rte_{model}_adalora_r2.png").read_bytes()[:8] == PNG_MAGIC
    assert not list((tmp_path / "o").glob("*_rte_adalora_r2.png"))


def test_duplicates_of_several_models_name_the_model(tmp_path, capsys):
    _write(tmp_path, "rte", "lora", 8, 0, 0.5, sub="a", model="minilm")
    _write(tmp_path, "rte", "lora", 8, 0, 0.9, sub="b", model="minilm")
    _write(tmp_path, "rte", "lora", 8, 0, 0.7, sub="b")
    code, _, err = _run([tmp_path, "--out", tmp_path / "o"], capsys)
    assert code == 0
    assert err.splitlines() == [f"warning: duplicate run task=rte model=minilm method=lora budget=8 lr=- seed=0: "
                                f"keeping {tmp_path / 'b' / 'rte-lora-8-s0-minilm' / 'results.json'}, "
                                f"dropping {tmp_path / 'a' / 'rte-lora-8-s0-minilm' / 'results.json'}"]


def test_runs_of_one_group_that_differ_in_their_config_are_named(tmp_path, capsys):
    # fields that change what a run computes: train.epochs, data.max_train_samples, model.random_config
    for seed, (epochs, samples, hidden) in enumerate([(3, 100, 16), (3, 200, 32), (1, 100, 16)]):
        _write(tmp_path, "rte", "lora", 8, seed, 0.5, lr=1e-3, config={
            "train": {"epochs": epochs, "device": f"cuda:{seed}", "progress": seed == 0, "log_every": seed + 1},
            "data": {"max_train_samples": samples, "cache_dir": f"/c{seed}"},
            "model": {"name": "tiny", "random_config": {"hidden_size": hidden}},
            "wandb": {"mode": "offline" if seed else "disabled"}, "seed": seed, "experiment_name": f"e{seed}"})
    # the same config at another lr and seed: no warning; a run written before a field existed: none either
    for seed in range(2):
        _write(tmp_path, "rte", "adalora", 8, seed, 0.6, lr=10.0 ** -(seed + 3), val=0.5,
               config={"train": {"epochs": 3} if seed else {}, "seed": seed, "method": {"lr": seed / 10}})
    code, _, err = _run([tmp_path, "--out", tmp_path / "o"], capsys)
    assert code == 0
    line = ("task=rte method=lora budget=8: its runs differ in train.epochs (3 vs 1), data.max_train_samples (100 vs 200), "
            'model.random_config ({"hidden_size":16} vs {"hidden_size":32}); they are summarised together')
    assert err.splitlines() == [f"warning: {line}"]
    md = (tmp_path / "o" / "summary.md").read_text()
    assert f"## Groups whose runs differ in their config" in md and f"\n- {line}\n" in md
    assert _row(md, "rte", "accuracy", "lora", "8", "3")  # still one row


def test_the_model_of_older_results_comes_from_the_config():
    from adarank.studies.runs import computation_config, record_model

    assert record_model({"model": "minilm", "config": {"model": {"name": "x"}}}) == "minilm"
    assert record_model({"config": {"model": {"name": "x"}}}) == "x"
    assert record_model({"config": {}}) is None
    config = {"seed": 1, "overwrite": True, "wandb": {"mode": "online"}, "task": {"name": "rte", "max_length": 64},
              "train": {"lr": 1e-3, "epochs": 3.0, "compile": True}, "method": {"targets": ["query"], "fused": True}}
    assert computation_config({"config": config}) == {"task.name": '"rte"', "task.max_length": "64",
                                                      "train.epochs": "3.0", "method.targets": '["query"]'}
