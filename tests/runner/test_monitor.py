"""adarank.runner.monitor: ‖ΔW‖_F per adapter, and the warning when it grows more than 10x within an epoch."""

from __future__ import annotations

import pytest
import torch

import adarank
from adarank.runner.monitor import NormWatch, adapter_norms

from conftest import BERT_TARGETS, randomize_lams, svd_bert, tiny_bert


def _reference(model) -> dict[str, float]:
    return {name: torch.linalg.matrix_norm(m.delta_weight()).item() for name, m in adarank.adapters(model)}


def test_svd_norms_equal_the_delta_weight_norms():
    model, _ = svd_bert()  # 11 adapters of three shapes: 16x16, 16->32, 32->16
    randomize_lams(model)
    got = adapter_norms(model)
    want = _reference(model)
    assert got.keys() == want.keys() and len(got) == 11
    for name, v in got.items():
        assert v.ndim == 0 and v.item() == pytest.approx(want[name], rel=1e-5), name


def test_lora_norms_equal_the_delta_weight_norms():
    model = tiny_bert()
    adarank.inject(model, "lora", r=3, alpha=6.0, targets=BERT_TARGETS)
    assert all(v.item() == 0 for v in adapter_norms(model).values())  # B = 0 at init
    with torch.no_grad():
        for _, m in adarank.adapters(model):
            m.lora_B.normal_()
    want = _reference(model)
    assert {k: pytest.approx(v.item(), rel=1e-5) for k, v in adapter_norms(model).items()} == want


def test_shrunk_to_rank_zero_is_a_zero_norm():
    model, _ = svd_bert()
    randomize_lams(model)
    (name, layer), *_ = adarank.svd_adapters(model)
    layer.keep(torch.tensor([], dtype=torch.long))
    norms = adapter_norms(model)
    assert layer.r == 0 and norms[name].item() == 0.0
    assert norms.keys() == _reference(model).keys()


def test_norm_watch_warns_once_per_module_and_epoch():
    watch = NormWatch(factor=10.0)
    assert watch.check({"a": 0.0, "b": 1.0}, epoch=0) == []  # a zero norm is no reference (LoRA starts at 0)
    assert watch.check({"a": 1.0, "b": 2.0}, epoch=0) == []  # a's reference is 1, b's stays 1
    assert watch.check({"a": 10.0, "b": 9.0}, epoch=0) == []  # exactly 10x is allowed
    (msg,) = watch.check({"a": 10.5, "b": 9.0}, epoch=0)
    assert msg.startswith("adapter norm of a grew 10.5x within epoch 0 (1 -> 10.5)") and "alpha/r" in msg
    assert watch.check({"a": 100.0, "b": 9.0}, epoch=0) == []  # a warned already in this epoch
    (msg,) = watch.check({"a": 100.0, "b": 20.0}, epoch=0)
    assert msg.startswith("adapter norm of b grew 20.0x")
    # a new epoch resets the references and the warnings
    assert watch.check({"a": 100.0, "b": 20.0}, epoch=1) == []
    assert watch.check({"a": 900.0, "b": 20.0}, epoch=1) == []
    assert [m.split()[3] for m in watch.check({"a": 1001.0, "b": 201.0}, epoch=1)] == ["a", "b"]


def test_norm_watch_reference_is_floored_by_the_base_weight_norm():
    # ‖W‖ = 50 gives a floor of 0.5: growing from 0.01 to 0.4 is an adapter leaving zero, not a blow-up
    watch = NormWatch(factor=10.0, floors={"a": 50.0})
    assert watch.check({"a": 0.01}, epoch=0) == []
    assert watch.check({"a": 0.4}, epoch=0) == []
    assert watch.check({"a": 5.0}, epoch=0) == []  # exactly 10x the floor
    (msg,) = watch.check({"a": 6.0}, epoch=0)
    assert msg.startswith("adapter norm of a grew 12.0x within epoch 0 (0.5 -> 6)")


def test_base_norms_reads_the_frozen_weights():
    from adarank.runner.monitor import base_norms

    base = torch.nn.Linear(4, 3)
    model = torch.nn.Sequential(adarank.LoraLinear(base, r=2, alpha=2.0))
    assert base_norms(model) == {"0": pytest.approx(float(base.weight.norm()))}
