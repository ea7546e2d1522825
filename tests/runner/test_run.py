"""adarank.runner.cli: one-line errors for user mistakes before any weights load, multirun, and the report over a sweep."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

import adarank.runner.models
import adarank.studies.report
import adarank.runner.cli
import adarank.runner.train

from e2e import GLUE_FIXTURES, TINY

# Each case: the overrides, then strings the one error line must contain (the field first).
BAD_CONFIGS = [
    (["method.rr=3"], ["method.rr", "not in 'MethodConfig'"]),
    (["train.lr=abc"], ["train.lr", "could not be converted to Float"]),
    (["seed=abc"], ["seed", "could not be converted to Integer"]),
    (["method=foo"], ["'method/foo'", "Available options in 'method': adalora, ", " full, ", " lora, "]),
    (["task=foo"], ["'task/foo'", "Available options in 'task'"]),
    (["model=nope"], ["'model/nope'", "tiny_random"]),
    (["method.beta1=1.5"], ["method.beta1", "[0, 1)"]),
    (["method.beta2=-0.1"], ["method.beta2", "[0, 1)"]),
    (["method.init_frac=0.6", "method.final_frac=0.5"], ["method.init_frac", "init_frac + final_frac must be < 1"]),
    (["train.batch_size=0"], ["train.batch_size", ">= 1"]),
    (["train.grad_accum=0"], ["train.grad_accum", ">= 1"]),
    (["train.max_steps=0"], ["train.max_steps", ">= 1"]),
    (["train.warmup_frac=1"], ["train.warmup_frac", "[0, 1)"]),
    (["train.precision=fp8"], ["train.precision", "'fp8'"]),
    (["train.speed=fast"], ["train.speed", "must be one of", "'fast'"]),
    (["train.speed=eager", "train.compile=true"], ["train.speed", "contradicts train.compile=true"]),
    (["train.device=tpu"], ["train.device", "'tpu'"]),
    (["train.cuda_graph=true", "train.compile=true"], ["train.cuda_graph", "not both"]),
    (["train.cuda_graph=true", "train.precision=fp16"], ["train.cuda_graph", "fp16"]),
    (["train.cuda_graph_shapes=0"], ["train.cuda_graph_shapes", ">= 1"]),
    (["model.dtype=int8"], ["model.dtype", "'int8'"]),
    (["wandb.mode=maybe"], ["wandb.mode", "'maybe'"]),
    (["task.max_length=4"], ["task.max_length", "[8, 8192]"]),
    (["data.val_fraction=1.5"], ["data.val_fraction", "(0, 1)"]),
    (["data.max_train_samples=0"], ["data.max_train_samples", ">= 1"]),
    (["data.dir=/nonexistent", "task=sst2"], ["data.dir", "/nonexistent is not a directory"]),
    # the message lists the model's linear layers, with layer indices collapsed
    (["method.targets=[nope]"], ["method.targets", "'nope' matches no linear layer",
                                 "bert.encoder.layer.N.attention.self.query", "bert.pooler.dense"]),
    (["method.target_regex=("], ["method.target_regex=("]),  # Hydra cannot even parse it unquoted
    (['method.target_regex="("'], ["method.target_regex", "invalid regex '('"]),
    (["method.score=foo"], ["method.score", "'foo'"]),
    (["method.orth_form=foo"], ["method.orth_form", "mean_norm"]),
    (["method.r=0"], ["method.r", ">= 1, got 0"]),
    (["method=lora", "method.r=0"], ["method.r", ">= 1, got 0"]),
    (["method.init_rank=2", "method.r=4"], ["method.r", "exceeds method.init_rank 2"]),
    (["method.target_total_rank=1000", "method.init_rank=4"], ["method.r", "(1000 triplets) exceeds", "raise method.init_rank"]),
    (["method.delta_t=0"], ["method.delta_t", ">= 1"]),
    (["method.alpha_ratio=-1"], ["method.alpha_ratio", "> 0"]),
    # one step: the final allocation would come before any importance was measured
    (["train.max_steps=1"], ["method.final_frac", "before any importance"]),
    (["method=peft_adalora", "train.max_steps=1"], ["method.final_frac", "before any importance"]),
    (["method.init_frac=0.4", "method.final_frac=0.5", "train.max_steps=3"],
     ["method.init_frac/method.final_frac", "no budgeting phase is left"]),
    (["+model.config_overrides.nope=1"], ["model.config_overrides.nope", "BertConfig has no such field"]),
    (["+model.config_overrides.num_hidden_layers=abc"], ["model.config_overrides.num_hidden_layers", "'abc' is not accepted"]),
    (["+model.config_overrides.hidden_act=nope"], ["model.config_overrides", "cannot be built with {'hidden_act': 'nope'}"]),
    (["model.name_or_path=/nonexistent/dir"], ["model.name_or_path", "/nonexistent/dir is not a directory"]),
    (["method.train_modules=[nope]"], ["method.train_modules", "not in 'MethodConfig'"]),
    (["model.train_modules=[nope]"], ["model.train_modules", "'nope' matches no module", "classifier"]),
    # multirun: every sweep value is checked, not only the first
    (["-m", "method.r=2,0"], ["method.r", ">= 1, got 0"]),
    # ... including the experiment's own hydra.sweeper.params (budget_sweep sweeps method.r up to 16)
    (["-m", "+experiment=budget_sweep", f"data.dir={GLUE_FIXTURES}", "data.val_fraction=0.5", "method.init_rank=4"],
     ["method.r", "target rank 8 exceeds method.init_rank 4"]),
]
if not torch.cuda.is_available():
    BAD_CONFIGS.append((["train.device=cuda"], ["train.device", "no CUDA device"]))
    BAD_CONFIGS.append((["train.cuda_graph=true"], ["train.cuda_graph", "needs one CUDA device", "got cpu"]))
    BAD_CONFIGS.append((["train.speed=fused+graph"], ["train.speed", "needs one CUDA device", "got cpu"]))


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any model weights are loaded."""

    def load_model(*args, **kwargs):
        pytest.fail("model weights were loaded for a bad config")

    monkeypatch.setattr(adarank.runner.models, "load_model", load_model)
    monkeypatch.setattr(adarank.runner.train, "load_model", load_model)


def _main(args: list[str]) -> int | None:
    with pytest.raises(SystemExit) as info:
        adarank.runner.cli.main(args)
    return info.value.code


@pytest.mark.usefixtures("no_weights")
@pytest.mark.parametrize("overrides,expected", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_the_field(tmp_path, capsys, overrides, expected):
    args = [*TINY, f"data.cache_dir={tmp_path / 'cache'}", *overrides]
    if "-m" in args:
        args = ["-m", *[a for a in args if a != "-m"], f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    else:
        args.append(f"hydra.run.dir={tmp_path / 'run'}")
    assert _main(args) == adarank.runner.cli.EXIT_USAGE
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("adarank: error: ") and "Traceback" not in err
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()  # stopped before Hydra ran the job


@pytest.mark.usefixtures("no_weights")
def test_an_output_dir_holding_a_run_is_not_overwritten(tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "results.json").write_text("{}")
    argv = list(sys.argv)
    assert _main([*TINY, f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={busy}"]) == adarank.runner.cli.EXIT_USAGE
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"adarank: error: {busy} already holds a run (results.json); "
                    "pass resume=true to continue it or overwrite=true to start over")
    assert (busy / "results.json").read_text() == "{}"
    assert sys.argv == argv  # main() hands sys.argv to Hydra and puts it back


def test_a_bug_is_a_traceback_not_a_user_error(tmp_path, monkeypatch):
    def preflight(cfg):
        raise RuntimeError("a bug in preflight")

    monkeypatch.setattr(adarank.runner.cli, "preflight", preflight)
    with pytest.raises(RuntimeError, match="a bug in preflight"):
        adarank.runner.cli.main([*TINY, f"hydra.run.dir={tmp_path}"])


def test_one_line_joins_hydra_messages_and_causes():
    try:
        try:
            raise OSError("inner\n  detail")
        except OSError as inner:
            raise ValueError("Could not find 'm/x'\n\nAvailable options in 'm':\n\ta\n\tb\nConfig search path: junk") from inner
    except ValueError as e:
        assert adarank.runner.cli.one_line(e) == "Could not find 'm/x'; Available options in 'm': a, b; inner; detail"


def test_variants_check_every_job_of_a_sweep():
    got = adarank.runner.cli._variants(["method=lora,adalora", "seed=0,1", "train.lr=1e-3", "hydra.run.dir=x"])
    assert got == [
        ["method=lora", "seed=0", "train.lr=1e-3"],
        ["method=lora", "seed=1", "train.lr=1e-3"],
        ["method=adalora", "seed=0", "train.lr=1e-3"],
        ["method=adalora", "seed=1", "train.lr=1e-3"],
    ]
    # a later value of a key replaces the earlier one in place (experiment sweep params, then the command line)
    assert adarank.runner.cli._variants(["method.r=1,2", "seed=0,1", "method.r=4"]) == [
        ["method.r=4", "seed=0"], ["method.r=4", "seed=1"]]


def test_variants_of_a_huge_sweep_check_every_value_once(monkeypatch):
    monkeypatch.setattr(adarank.runner.cli, "MAX_CHECKED_COMBINATIONS", 3)
    got = adarank.runner.cli._variants(["method=lora,adalora", "seed=0,1"])
    assert got == [["method=lora", "seed=0"], ["method=adalora", "seed=0"], ["method=lora", "seed=1"]]


def test_a_bad_combination_of_sweep_values_is_caught_before_the_sweep(capsys):
    """Each value is fine alone; only the pair (adalora, max_steps=1) has no budgeting phase."""
    with pytest.raises(SystemExit) as e:
        adarank.runner.cli.main(["-m", "model=tiny_random", "method=lora,adalora", "train.max_steps=100,1",
                          "data.max_train_samples=64", "wandb.mode=disabled"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adarank: error: method.final_frac")


@pytest.mark.usefixtures("no_weights")
def test_an_experiment_sweep_passes_prevalidation(monkeypatch):
    # every job of budget_sweep's hydra.sweeper.params (3 methods x 5 ranks x 3 seeds) is composed and preflighted
    checked = []
    real = adarank.runner.cli.preflight
    monkeypatch.setattr(adarank.runner.cli, "preflight", lambda cfg: checked.append((cfg.method.name, cfg.method.r, cfg.seed)) or real(cfg))
    args = ["-m", "+experiment=budget_sweep", *TINY, f"data.dir={GLUE_FIXTURES}", "data.val_fraction=0.5"]
    assert adarank.runner.cli.prevalidate(args) is None
    assert checked == [(m, r, seed) for m in ("lora", "rslora", "adalora") for r in (1, 2, 4, 8, 16) for seed in (0, 1, 2)]


# ---- multirun, and the report over its results -------------------------------------------------


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """`python -m adarank.run -m method=lora,adalora seed=0,1` in fast mode: four runs."""
    root = tmp_path_factory.mktemp("multirun")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adarank.runner.cli.main(["-m", "method=lora,adalora", "seed=0,1", *TINY, f"data.cache_dir={root / 'cache'}",
                          f"hydra.sweep.dir={root / 'sweep'}"])
    finally:
        torch.set_num_threads(threads)
    return root / "sweep"


def test_multirun_writes_one_dir_per_override_combination(sweep):
    runs = sorted(p.parent for p in sweep.rglob("results.json"))
    assert len(runs) == 4 and all(p.parent == sweep for p in runs)  # no folders nested by paths in overrides
    seen = set()
    for run_dir in runs:
        res = json.loads((run_dir / "results.json").read_text())
        name = run_dir.name
        assert f"method={res['method']}" in name.split(",") and f"seed={res['seed']}" in name.split(",")
        assert "model=tiny_random" in name and "cache" not in name and "wandb" not in name
        assert res["steps"] == 20 and (run_dir / ".hydra" / "overrides.yaml").is_file()
        seen.add((res["method"], res["seed"]))
    assert seen == {("lora", 0), ("lora", 1), ("adalora", 0), ("adalora", 1)}


def test_report_aggregates_the_sweep(sweep, tmp_path, capsys):
    out = tmp_path / "report"
    assert adarank.studies.report.main([str(sweep), "--out", str(out)]) == 0
    with open(out / "runs.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == adarank.studies.report.COLUMNS
    assert sorted((r["method"], r["seed"]) for r in rows) == [("adalora", "0"), ("adalora", "1"), ("lora", "0"), ("lora", "1")]
    assert {(r["task"], r["budget"], r["steps"], r["metric"]) for r in rows} == {("tweets", "2", "20", "accuracy")}
    summary = (out / "summary.md").read_text()
    assert "## Paired differences over seeds (reference: adalora)" in summary
    paired = summary.split("## Paired differences")[1]
    assert "| tweets | 2 | adalora - lora | 2 |" in paired


def test_a_diverged_job_of_a_sweep_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    # lr=1e30 diverges at once (see test_resume); the other job must still run and write its results
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adarank.runner.cli.main(["-m", "method=lora", "train.lr=1e30,1e-3", "train.log_every=1", *TINY,
                          f"data.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    finally:
        torch.set_num_threads(threads)
    diverged = list((tmp_path / "sweep").rglob("diverged.json"))
    finished = list((tmp_path / "sweep").rglob("results.json"))
    assert len(diverged) == 1 and "train.lr=1e+30" in diverged[0].parent.name
    assert len(finished) == 1 and "train.lr=0.001" in finished[0].parent.name
    record = json.loads(diverged[0].read_text())
    assert "loss is nan" in record["error"] and "train.lr=1e+30" in record["overrides"]
    assert "adarank: error: " in capsys.readouterr().err
