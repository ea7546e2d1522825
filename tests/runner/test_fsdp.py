"""train.distributed: the config's refusals and the FSDP helpers in one process (the 2-process runs are in
tests/e2e/test_fsdp.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adarank.runner import fsdp
from adarank.runner.config import TrainConfig
from adarank.runner.distributed import DistInfo
from adarank.runner.train import setup_env

from e2e import tiny_config


@pytest.mark.parametrize("kwargs, says", [
    ({"distributed": "zero3"}, "train.distributed: must be one of ('ddp', 'fsdp'), got 'zero3'"),
    ({"distributed": "fsdp", "compile": True}, "train.distributed: fsdp is not combined with train.compile"),
    ({"distributed": "fsdp", "cuda_graph": True}, "train.distributed: fsdp is not combined with train.compile or train.cuda_graph"),
])
def test_bad_distributed_settings_are_one_line_errors_naming_the_field(kwargs, says):
    with pytest.raises(ValueError) as info:
        TrainConfig(**kwargs)
    assert str(info.value).startswith(says) and "\n" not in str(info.value)


def test_fsdp_with_a_quantized_base_is_refused_before_any_model_loads(tmp_path):
    with pytest.raises(ValueError, match=r"^train.distributed: fsdp shards plain weights; not with model.quantization"):
        tiny_config(tmp_path, "method=adalora", "model.quantization=nf4", "train.distributed=fsdp")


def test_fsdp_with_full_fine_tuning_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^train.distributed: fsdp shards the frozen base, and method=full trains"):
        tiny_config(tmp_path, "method=full", "train.distributed=fsdp")


def test_fsdp_outside_torchrun_is_refused(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"^train.distributed: fsdp needs several processes; launch with torchrun"):
        setup_env(TrainConfig(distributed="fsdp", device="cpu"), print)
    assert not setup_env(TrainConfig(device="cpu"), print).fsdp  # ddp (the default) runs as one process


def test_the_blocks_are_the_module_lists_children_that_hold_frozen_weights():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    model = nn.Sequential(nn.ModuleList([nn.Sequential(frozen, nn.Linear(2, 2)), nn.Linear(2, 2).requires_grad_(False)]),
                          nn.ModuleList([nn.Linear(2, 2)]))  # a list of trainable modules only: nothing to shard
    assert fsdp.blocks(model) == [model[0][0], model[0][1]]


def test_one_process_leaves_the_gradients_as_they_are():
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.arange(3.0)
    fsdp.average_grads([p], DistInfo())
    assert torch.equal(p.grad, torch.arange(3.0))
    with fsdp.ReplicatedGrads().no_sync():  # the loop's no_sync under FSDP: nothing to skip
        pass
