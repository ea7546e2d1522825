"""Rank patterns: loading, the control transforms, and LoRA injected with per-module ranks (0 = unadapted)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from adarank.export import export_peft
from adarank.inject import adapters, find_targets, inject
from adarank.rank_pattern import load_rank_pattern, resolve_ranks, reverse_layers, shuffle, transform, uniform

from conftest import BERT_TARGETS, tiny_bert

PATTERN = {f"bert.encoder.layer.{i}.attention.self.{t}": r for i in range(3) for t, r in
           (("query", 1 + i), ("value", 3 * i))}


def test_shuffle_keeps_the_multiset_and_is_seeded():
    a, b = shuffle(PATTERN, 0), shuffle(PATTERN, 0)
    assert a == b and Counter(a.values()) == Counter(PATTERN.values()) and set(a) == set(PATTERN)
    assert any(shuffle(PATTERN, s) != PATTERN for s in range(5))
    within = shuffle(PATTERN, 3, within="type")
    assert sorted(v for k, v in within.items() if k.endswith("query")) == [1, 2, 3]


def test_uniform_and_reverse_layers():
    u = uniform(PATTERN)
    assert sum(u.values()) == sum(PATTERN.values()) and max(u.values()) - min(u.values()) <= 1
    rev = reverse_layers(PATTERN)
    assert rev["bert.encoder.layer.0.attention.self.value"] == 6 and rev["bert.encoder.layer.2.attention.self.query"] == 1
    with pytest.raises(ValueError, match="method.rank_pattern_transform"):
        transform(PATTERN, "nope")


def test_load_from_results_and_adapter_round_trip(tmp_path):
    model = tiny_bert()
    names = find_targets(model, BERT_TARGETS)
    ranks = {n: i % 3 for i, n in enumerate(names)}  # zeros included
    (tmp_path / "results.json").write_text(json.dumps({"final_ranks": ranks}))
    assert resolve_ranks(names, load_rank_pattern(str(tmp_path))) == ranks
    inject(model, "lora", 8, 16.0, BERT_TARGETS, train_modules=["classifier"], ranks=ranks)
    got = {n: layer.r for n, layer in adapters(model)}
    assert got == {n: r for n, r in ranks.items() if r > 0}
    assert got["bert.encoder.layer.0.attention.self.value"] == 1
    for _, layer in adapters(model):
        assert layer.scale == pytest.approx(16.0 / layer.r)
        torch.nn.init.normal_(layer.lora_B)
    export_peft(model, str(tmp_path / "adapter"))
    assert resolve_ranks(names, load_rank_pattern(str(tmp_path / "adapter"))) == ranks
    with pytest.raises(ValueError, match="method.rank_pattern: .* not among"):
        resolve_ranks(names[:2], ranks)
