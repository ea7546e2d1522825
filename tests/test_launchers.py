"""The Hydra launcher configs under conf/hydra/launcher/ compose, and point at the installed plugins."""

from __future__ import annotations

import importlib

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from adarank.run import CONF_DIR


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
