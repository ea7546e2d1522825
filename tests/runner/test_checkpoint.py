"""adarank.runner.checkpoint: the trainable state and the RNG states survive a save and a load."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from adarank.runner import checkpoint as ckpt

from conftest import svd_bert


def _draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randint(0, 100, (2,)).tolist()


def test_trainable_state_round_trip(tmp_path):
    model, _ = svd_bert()
    state = ckpt.trainable_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable and all(n.endswith((".P", ".lam", ".Q")) or "classifier" in n for n in state)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert not torch.equal(state["classifier.weight"], model.classifier.weight)  # a copy, not a view

    assert ckpt.load(str(tmp_path)) is None
    path = ckpt.save(str(tmp_path), {"model": state, "step": 7})
    assert path == str(tmp_path / ckpt.CKPT_NAME) and not list(tmp_path.glob(".*.tmp"))
    loaded = ckpt.load(str(tmp_path))
    assert loaded["step"] == 7

    other, _ = svd_bert(seed=1)
    ckpt.load_trainable_state(other, loaded["model"])
    assert all(torch.equal(p, state[n]) for n, p in other.named_parameters() if n in state)
    frozen = {n for n, p in other.named_parameters() if not p.requires_grad}
    base, _ = svd_bert(seed=1)
    assert all(torch.equal(p, dict(base.named_parameters())[n]) for n, p in other.named_parameters() if n in frozen)


def test_loading_a_mismatched_state_names_the_parameter():
    model, _ = svd_bert()
    state = ckpt.trainable_state(model)
    with pytest.raises(ValueError, match="checkpoint: parameters not in the model: \\['nope.weight'\\]"):
        ckpt.load_trainable_state(model, {"nope.weight": torch.zeros(1)})
    name = next(n for n in state if n.endswith(".lam"))
    with pytest.raises(ValueError, match=f"checkpoint: shape of {name} is \\(2,\\), model has \\(4,\\)"):
        ckpt.load_trainable_state(model, {name: torch.zeros(2)})


def test_rng_states_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ckpt.save(str(tmp_path), {"rng": ckpt.rng_state()})
    expected = _draws()
    _draws()  # move every generator on
    ckpt.set_rng_state(ckpt.load(str(tmp_path))["rng"])
    assert _draws() == expected
