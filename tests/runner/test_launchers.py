"""The Hydra launcher configs under conf/hydra/launcher/ compose, and point at the installed plugins."""

from __future__ import annotations

import importlib

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from adarank.runner.cli import CONF_DIR


@pytest.mark.parametrize(
    "name, target, fields",
    [
        ("joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", {"n_jobs": 4}),
        ("submitit_slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
         {"gpus_per_node": 1, "tasks_per_node": 1, "timeout_min": 240}),
    ],
)
def test_launcher_config_composes_and_its_target_imports(name, target, fields):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={name}", "+experiment=glue_minilm_mrpc"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == target
    for k, v in fields.items():
        assert launcher[k] == v
    module, cls = target.rsplit(".", 1)
    assert hasattr(importlib.import_module(module), cls)


def test_slurm_launcher_fields_are_the_plugins_schema():
    """Our file shadows the plugin's config, so it must carry exactly the plugin's fields."""
    import dataclasses

    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=submitit_slurm"], return_hydra_config=True)
    assert set(cfg.hydra.launcher) == {f.name for f in dataclasses.fields(SlurmQueueConf)}


def test_a_joblib_multirun_really_runs_its_jobs_in_worker_processes(tmp_path):
    """`python -m adarank.run -m hydra/launcher=joblib ...` end to end, in a subprocess as a user types it.
    The workers unpickle the task by module name: run as `__main__`, it once failed to un-serialize."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "adarank.run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           "method=lora,adalora", "model=tiny_random", "train.max_steps=6", "train.batch_size=8",
           "data.max_train_samples=64", "data.max_eval_samples=32", "wandb.mode=disabled", "train.progress=false",
           f"data.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = sorted(p.parent.name for p in (tmp_path / "sweep").rglob("results.json"))
    assert len(done) == 2 and "method=adalora" in done[0] and "method=lora" in done[1]
