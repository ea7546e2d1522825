"""adarank.runner: resuming refuses a changed config, one run owns an output dir, problems known before the first
step fail before any model loads, and the command line gives one line instead of a traceback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import adarank.runner.cli as cli
import adarank.runner.train
from adarank.runner import checkpoint as ckpt
from adarank.runner.lock import LOCK_NAME, OutDirBusy, OutDirLock
from adarank.runner.resume import MAY_DIFFER, config_differences

from e2e import GLUE_FIXTURES, TINY, capture_models, one_thread, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(capsys, tmp_path, *overrides: str) -> tuple[int | None, str]:
    """Run the command line in-process; (exit code or None, stderr)."""
    try:
        cli.main([*TINY, f"data.cache_dir={tmp_path / 'cache'}", *overrides])
        code = None
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any model weights load."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(adarank.runner.train, "load_model", refuse)
    monkeypatch.setattr(adarank.runner.train, "load_causal_lm", refuse)


def _killed_run(tmp_path, monkeypatch, out: Path, *overrides: str) -> None:
    """A run killed during step 12 with checkpoints every 5 steps (so the checkpoint holds step 10)."""
    capture_models(monkeypatch, kill_at=12)
    with pytest.raises(KeyboardInterrupt):
        adarank.runner.train.train(tiny_config(tmp_path, "train.checkpoint_every=5", *overrides), str(out), log=lambda *_: None)
    monkeypatch.undo()
    assert ckpt.load(str(out))["step"] == 10


# ---- 1. resume refuses a changed config -----------------------------------------------------------
@pytest.mark.parametrize("change,field,old,new", [
    ("train.lr=0.01", "train.lr", "0.001", "0.01"),
    ("train.max_steps=24", "train.max_steps", "20", "24"),
    ("method.r=4", "method.r", "2", "4"),
    ("seed=1", "seed", "0", "1"),
])
def test_resume_with_a_changed_field_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys, change, field, old, new):
    out = tmp_path / "run"
    _killed_run(tmp_path, monkeypatch, out)
    monkeypatch.setattr(adarank.runner.train, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    code, err = _cli(capsys, tmp_path, "train.checkpoint_every=5", "resume=true", change, f"hydra.run.dir={out}")
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1, err
    assert f"{field}: {old} in the checkpoint, {new} now" in err and str(out) in err
    assert ckpt.load(str(out))["step"] == 10 and not (out / "results.json").exists()  # nothing was lost


def test_resume_may_change_what_cannot_change_the_result(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _killed_run(tmp_path, monkeypatch, out)
    code, err = _cli(capsys, tmp_path, "train.checkpoint_every=7", "train.log_every=3", "resume=true", f"hydra.run.dir={out}")
    assert code is None, err
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 20 and res["config"]["train"]["log_every"] == 3


def test_config_differences_skip_only_the_fields_that_cannot_change_the_result():
    saved = {"train": {"lr": 1e-3, "progress": True, "device": "cpu"}, "seed": 0, "resume": False, "wandb": {"mode": "offline"}}
    now = {"train": {"lr": 1e-2, "progress": False, "device": "cuda"}, "seed": 0, "resume": True, "wandb": {"mode": "disabled"}}
    assert config_differences(saved, now) == [("train.lr", 1e-3, 1e-2)]
    assert config_differences(saved, {**saved, "seed": 1, "extra": 2}) == [("extra", None, 2), ("seed", 0, 1)]
    assert {"train.lr", "method.r", "seed", "train.max_steps", "train.precision"}.isdisjoint(MAY_DIFFER)


def test_the_checkpoint_records_the_resolved_config(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _killed_run(tmp_path, monkeypatch, out, "method.alpha_ratio=2")
    saved = ckpt.load(str(out))["config"]
    assert saved["method"]["alpha"] == 4.0 and saved["train"]["lr"] == 1e-3  # α after alpha_ratio (2 × r=2)


# ---- 2. one owner per output dir ------------------------------------------------------------------
def _lock_of(out: Path, pid: int, host: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "then"}))


def test_a_second_run_into_a_busy_dir_is_one_line_naming_the_dir_and_the_owner(tmp_path, capsys, no_model):
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        _lock_of(out, owner.pid)
        code, err = _cli(capsys, tmp_path, f"hydra.run.dir={out}")
    finally:
        owner.kill()
        owner.wait()
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1, err
    assert f"{out} is in use by another run (pid {owner.pid} on host {socket.gethostname()}" in err
    assert (out / LOCK_NAME).exists() and not (out / "results.json").exists()  # the owner's lock stays


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_the_lock_goes_at_the_end(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    _lock_of(out, dead.pid)
    code, err = _cli(capsys, tmp_path, "train.max_steps=4", f"hydra.run.dir={out}")
    assert code is None, err
    assert (out / "results.json").exists() and not (out / LOCK_NAME).exists()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    out = tmp_path / "run"
    _lock_of(out, 1, host="elsewhere.example")
    with pytest.raises(OutDirBusy, match="on host elsewhere.example"):
        with OutDirLock(str(out)):
            pass


def test_the_lock_is_released_when_the_run_fails(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _cli(capsys, tmp_path, "train.lr=1e30", "train.checkpoint_every=5", "train.log_every=1", f"hydra.run.dir={out}")
    assert code == cli.EXIT_DIVERGED and not (out / LOCK_NAME).exists()


def test_two_real_runs_into_one_dir(tmp_path):
    """Two processes: the second one, started while the first holds the dir, is refused in one line."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-m", "adarank.run", *TINY, f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={out}"]
    first = subprocess.Popen([*args, "train.max_steps=400"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):  # wait for its lock
            if (out / LOCK_NAME).exists() or first.poll() is not None:
                break
            __import__("time").sleep(0.05)
        assert first.poll() is None, first.stderr.read().decode()[-2000:]
        second = subprocess.run([*args, "train.max_steps=4"], env=env, capture_output=True, text=True, timeout=120)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == cli.EXIT_USAGE
    assert second.stderr.strip().count("\n") == 0 and f"{out} is in use by another run (pid {first.pid}" in second.stderr


# ---- 4. what is knowable before the first step ----------------------------------------------------
def _glue_copy(tmp_path) -> Path:
    data = tmp_path / "glue"
    shutil.copytree(GLUE_FIXTURES, data)
    return data


def test_an_empty_dev_split_fails_before_training(tmp_path, capsys, no_model):
    data = _glue_copy(tmp_path)
    dev = data / "MRPC" / "dev.tsv"
    dev.write_text(dev.read_text().splitlines()[0] + "\n")  # the header alone
    code, err = _cli(capsys, tmp_path, "task=mrpc", f"data.dir={data}", "data.val_fraction=0.5", f"hydra.run.dir={tmp_path / 'o'}")
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1, err
    assert str(dev) in err and "no data rows" in err  # the data loader names the file


def test_a_split_left_empty_is_refused_before_training():
    from datasets import Dataset

    with pytest.raises(ValueError, match="the validation split of mrpc in /glue has no rows"):
        cli.check_splits({"train": Dataset.from_dict({"a": [1]}), "validation": Dataset.from_dict({"a": []})}, "mrpc", "/glue")


def test_a_max_length_past_the_models_positions_fails_before_training(tmp_path, capsys, no_model):
    code, err = _cli(capsys, tmp_path, "task.max_length=2048", f"hydra.run.dir={tmp_path / 'o'}")
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1, err
    assert "task.max_length: 2048 tokens exceed the model's 512 positions" in err


def test_fp16_weights_on_a_cpu_are_refused(tmp_path, capsys, no_model):
    code, err = _cli(capsys, tmp_path, "model.dtype=float16", "train.device=cpu", f"hydra.run.dir={tmp_path / 'o'}")
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1 and err.startswith("adarank: error: model.dtype: float16")


# ---- 6. one line, not a traceback ---------------------------------------------------------------
def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path, capsys, no_model):
    (tmp_path / "afile").write_text("")
    code, err = _cli(capsys, tmp_path, f"hydra.run.dir={tmp_path / 'afile' / 'run'}")
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1, err
    assert err.startswith("adarank: error: hydra.run.dir: cannot create the output dir") and "not a directory" in err
    assert not list(tmp_path.glob(".adarank-probe-*"))  # the probe left nothing behind


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys, no_model):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    broken = tmp_path / "conf" / "experiment" / "broken.yaml"
    broken.write_text("# @package _global_\ntrain:\n  lr: [1e-3\n")
    code, err = _cli(capsys, tmp_path, "+experiment=broken", f"hydra.searchpath=[file://{tmp_path / 'conf'}]")
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1, err
    assert f'"{broken}", line 3' in err


def test_wandb_online_without_credentials_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, no_model):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    code, err = _cli(capsys, tmp_path, "wandb.mode=online", f"hydra.run.dir={tmp_path / 'o'}")
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1 and "wandb.mode: online needs W&B credentials" in err
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    from adarank.runner.tracking import wandb_credentials

    assert wandb_credentials()


def test_the_log_file_holds_the_runs_lines(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _cli(capsys, tmp_path, "train.max_steps=4", f"hydra.run.dir={out}")
    assert code is None, err
    text = (out / "run.log").read_text()
    assert "T=4 optimizer steps" in text and "[adalora on tweets] dev accuracy" in text.splitlines()[-1]


# ---- 3. checkpoints that survive corruption, through the command line ------------------------------
def test_a_resume_whose_checkpoints_are_all_unusable_is_one_line_naming_them(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _killed_run(tmp_path, monkeypatch, out)
    monkeypatch.setattr(adarank.runner.train, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    newest, previous = ckpt.paths(str(out))
    for path in (newest, previous):
        if os.path.exists(path):
            with open(path, "r+b") as f:
                f.truncate(100)
    code, err = _cli(capsys, tmp_path, "train.checkpoint_every=5", "resume=true", f"hydra.run.dir={out}")
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1, err
    assert newest in err


def test_a_finished_run_leaves_no_checkpoint_files(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _cli(capsys, tmp_path, "train.checkpoint_every=3", f"hydra.run.dir={out}")
    assert code is None, err
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == []


def test_overwrite_removes_the_old_runs_checkpoints(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _killed_run(tmp_path, monkeypatch, out)
    assert any("prev" in p.name for p in out.iterdir())
    code, err = _cli(capsys, tmp_path, "train.max_steps=4", "overwrite=true", f"hydra.run.dir={out}")
    assert code is None, err
    assert [p.name for p in out.iterdir() if "checkpoint" in p.name] == []


# ---- 5. a module adapted and trained in full ------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "adalora", "peft_lora", "peft_adalora"])
def test_adapting_a_fully_trained_module_is_one_line_before_the_model_loads(tmp_path, capsys, no_model, method):
    code, err = _cli(capsys, tmp_path, f"method={method}", "method.targets=[classifier]", f"hydra.run.dir={tmp_path / 'o'}")
    assert code == cli.EXIT_USAGE and len(err.splitlines()) == 1, err
    assert "method.targets: classifier is also trained in full by model.train_modules (classifier)" in err


def test_the_peft_baselines_refuse_the_overlap_too():
    from adarank.runner.config import MethodConfig, ModelConfig
    from adarank.runner.methods import apply_method
    from conftest import tiny_bert

    model_cfg = ModelConfig(name="x", name_or_path="random", targets=["query"], train_modules=["classifier"])
    for name in ("peft_lora", "peft_adalora"):
        with pytest.raises(ValueError, match="also trained in full"):
            apply_method(tiny_bert(), MethodConfig(name=name, r=2, targets=["classifier"]), model_cfg)
