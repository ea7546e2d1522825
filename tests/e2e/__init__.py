"""End-to-end runs of the training runner on the tiny random BERT (and one on MiniLM), all on CPU.

Shared helpers: compose a config the way `python -m adarank.run` does, run `adarank.runner.train.train`, and
watch or interrupt the model that `train` builds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

import adarank.runner.cli
import adarank.runner.train
from adarank.runner.config import Config

__all__ = [
    "GLUE_FIXTURES", "TINY", "capture_models", "compose_config", "differing_tensors", "one_thread", "run", "tiny_config",
]

#: The tiny GLUE TSV files in the official layout (1-5 rows per split).
GLUE_FIXTURES = str(Path(__file__).resolve().parents[1] / "runner" / "data" / "fixtures" / "glue")

#: Fast mode: the 2-layer random BERT, 20 optimizer steps of 8 examples, few eval rows, no W&B.
TINY = [
    "model=tiny_random",
    "train.max_steps=20",
    "train.batch_size=8",
    "data.max_train_samples=64",
    "data.max_eval_samples=32",
    "wandb.mode=disabled",
    "train.progress=false",
]


def compose_config(overrides: list[str], hydra_config: bool = False):
    """The DictConfig for these command-line overrides (Hydra's global state is restored afterwards)."""
    with initialize_config_dir(config_dir=adarank.runner.cli.CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra_config)


def tiny_config(tmp_path: Path, *overrides: str) -> Config:
    """The typed config of a fast run; tokenisation is cached under tmp_path, not in ~/.cache."""
    return adarank.runner.cli.to_config(compose_config([*TINY, f"data.cache_dir={tmp_path / 'cache'}", *overrides]))


def run(cfg: Config, out_dir: Path) -> dict[str, Any]:
    """train() quietly; returns results.json as read back from disk."""
    adarank.runner.train.train(cfg, str(out_dir), log=lambda *_: None)
    return json.loads((out_dir / "results.json").read_text())


def capture_models(monkeypatch: pytest.MonkeyPatch, kill_at: int | None = None) -> list[nn.Module]:
    """Record every model train() adapts (the same objects it trains, so they end in the final state).

    With `kill_at=N`, the N-th training forward pass raises KeyboardInterrupt: with grad_accum=1 the run
    dies during optimizer step N, after the checkpoints of the earlier steps were written.
    """
    built: list[nn.Module] = []
    real = adarank.runner.train.apply_method

    def spy(model, method, model_cfg):
        adapted = real(model, method, model_cfg)
        built.append(adapted.model)
        if kill_at is not None:
            calls = 0

            def kill(module, args, kwargs):
                nonlocal calls
                if module.training:
                    calls += 1
                    if calls == kill_at:
                        raise KeyboardInterrupt

            adapted.model.register_forward_pre_hook(kill, with_kwargs=True)
        return adapted

    monkeypatch.setattr(adarank.runner.train, "apply_method", spy)
    return built


@pytest.fixture
def one_thread():
    """Tiny matmuls run fastest on one thread; on a busy 2-core runner, two threads thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def differing_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in shape or in any bit (empty when a and b are identical)."""
    assert a.keys() == b.keys()
    return [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
