"""adarank.runner.train: the derived step count, the lr schedule, devices, and a run logged to offline W&B."""

from __future__ import annotations

import math

import pytest
import torch

from adarank.runner.train import amp_dtype, lr_lambda, pick_device, total_steps

from e2e import run, tiny_config
from test_tracking import read_run


@pytest.mark.parametrize(
    "n_batches,epochs,grad_accum,max_steps,expected",
    [
        (10, 3, 1, None, 30),
        (10, 3, 4, None, 9),  # each epoch ends with a partial accumulation step: ceil(10 / 4) = 3
        (10, 0.5, 1, None, 5),
        (1, 0.1, 1, None, 1),  # never 0
        (10, 3, 1, 7, 7),  # max_steps wins
    ],
)
def test_total_steps_is_derived_from_the_loader(n_batches, epochs, grad_accum, max_steps, expected):
    assert total_steps(n_batches, epochs, grad_accum, max_steps) == expected


def test_lr_warms_up_linearly_then_decays_to_zero():
    f = lr_lambda(warmup=4, total=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(12) == 0.5 and f(20) == 0.0
    assert lr_lambda(0, 10)(0) == 1.0  # no warm-up: full lr from the first step


def test_cpu_trains_in_fp32_and_a_missing_gpu_is_a_config_error():
    cpu = torch.device("cpu")
    assert all(amp_dtype(p, cpu) is None for p in ("auto", "fp32", "bf16", "fp16"))
    assert amp_dtype("fp16", torch.device("cuda")) is torch.float16
    assert amp_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert pick_device("cpu") == cpu
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device: cuda:1 requested but no CUDA device"):
            pick_device("cuda:1")


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """Quiet offline W&B that writes nothing outside tmp_path, and no service left running afterwards."""
    wandb = pytest.importorskip("wandb")
    for var, value in {"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
                       "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(var, value)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    yield
    wandb.teardown()


@pytest.mark.usefixtures("offline_wandb")
def test_offline_wandb_logs_loss_budget_and_eval(tmp_path):
    out = tmp_path / "out"
    cfg = tiny_config(tmp_path, "method=adalora", "wandb.mode=offline", "train.max_steps=10", "train.log_every=5")
    res = run(cfg, out)

    (run_file,) = out.glob("wandb/offline-run-*/run-*.wandb")
    got = read_run(run_file)
    record = got["run"]
    assert (record.run_group, record.job_type, list(record.tags)) == ("quickstart", "adalora", ["tweets", "adalora", "tiny_random"])
    assert record.display_name == "out" and record.project == "adarank"
    assert got["config"]["method"]["name"] == "adalora" and got["config"]["train"]["max_steps"] == 10

    history = got["history"]
    for step in (5, 10):
        row = history[step]
        assert math.isfinite(row["train/loss"]) and row["train/lr"] >= 0
        assert row["alloc/budget"] == dict(res["budget_curve"])[step]
        assert sum(v for k, v in row.items() if k.startswith("rank/")) <= 36
        assert any(k.startswith("norm/") for k in row)
    # evaluation at the end of the epoch (8 batches of 8) and at the last step
    for step in (8, 10):
        assert {"eval/val/accuracy", "eval/val/macro_f1", "eval/validation/accuracy"} <= set(history[step])
    assert history[10]["eval/validation/accuracy"] == res["value"]
    assert history[10]["ranks/total"] == 24  # the final ranks, with their table and heatmap
    assert got["summary"]["final/validation/accuracy"] == res["value"]


def test_results_record_a_hash_of_the_source_that_ran(tmp_path, monkeypatch):
    import adarank.runner.train as train

    res = run(tiny_config(tmp_path, "method=lora", "wandb.mode=disabled", "train.max_steps=2"), tmp_path / "out")
    assert res["code_sha256"] == train.code_sha256() and len(res["code_sha256"]) == 64
    # the hash follows the bytes of the package: a copy with one file changed hashes differently
    import shutil
    from pathlib import Path

    from adarank.runner import provenance

    copy = tmp_path / "pkg" / "adarank"
    shutil.copytree(provenance.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "PACKAGE_ROOT", copy)
    same = train.code_sha256()
    (copy / "layers.py").write_text((copy / "layers.py").read_text() + "\n# edited\n")
    assert same == res["code_sha256"] and train.code_sha256() != same


def test_the_source_hash_covers_what_trains_and_not_the_studies(tmp_path, monkeypatch):
    import shutil

    from adarank.runner import provenance

    copy = tmp_path / "pkg" / "adarank"
    shutil.copytree(provenance.PACKAGE_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(provenance, "PACKAGE_ROOT", copy)
    before = provenance.code_sha256()
    for study in (copy / "studies" / "report.py", copy / "report.py", copy / "analyze.py"):
        study.write_text(study.read_text() + "\n# edited\n")
    assert provenance.code_sha256() == before  # a report is not part of what trains
    for trains in (copy / "runner" / "step.py", copy / "fast" / "fused.py", copy / "allocator.py"):
        text = trains.read_text()
        trains.write_text(text + "\n# edited\n")
        assert provenance.code_sha256() != before, trains
        trains.write_text(text)
    assert provenance.code_sha256() == before
