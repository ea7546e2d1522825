"""Fused adapters on one input computed as one group (adarank/fast/siblings.py): which ones are grouped, that
a grouped model computes what the ungrouped one does, and that anything unusual falls back to one by one."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import LLAMA_TARGETS, VOCAB, adamw_curve, tiny_llama
from torch import nn

import adarank
import adarank.fast.siblings as siblings_mod


def _model(kind: str = "lora", fused: bool = True, dropout: float = 0.0):
    m = tiny_llama()
    adarank.inject(m, kind, r=4, alpha=8.0, targets=LLAMA_TARGETS, fused=fused, dropout=dropout)
    with torch.no_grad():  # non-zero B / λ, so every adapter contributes
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(hash(n) % 1000))
    return m


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def _group_calls(monkeypatch) -> list[int]:
    """Sizes of the group calls the siblings make."""
    calls: list[int] = []
    real = siblings_mod.adapted_linears
    monkeypatch.setattr(siblings_mod, "adapted_linears", lambda x, h, ads: calls.append(len(ads)) or real(x, h, ads))
    return calls


def test_q_k_v_and_gate_up_are_grouped_from_the_second_forward(monkeypatch):
    m = _model()
    attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    assert attn.q_proj.siblings is attn.o_proj.siblings  # candidates: same parent, same input width
    assert mlp.down_proj.siblings is None  # the only adapter of its width in the MLP
    calls = _group_calls(monkeypatch)
    ids = _ids()
    m(input_ids=ids)  # observes: every adapter alone
    assert calls == []
    s = attn.q_proj.siblings
    assert s.group_of(attn.q_proj) == s.group_of(attn.v_proj) == (attn.q_proj, attn.k_proj, attn.v_proj)
    assert s.group_of(attn.o_proj) == ()  # o reads the attention's output
    assert mlp.gate_proj.siblings.group_of(mlp.up_proj) == (mlp.gate_proj, mlp.up_proj)
    m(input_ids=ids)
    assert calls == [3, 2] * len(m.model.layers)
    assert not attn.q_proj.siblings.dissolved


@pytest.mark.parametrize("kind", ["lora", "svd"])
def test_a_grouped_model_trains_like_the_unfused_one(kind):
    models = [_model(kind, fused=False), _model(kind, fused=True)]
    for m in models:
        m.train()
    batches = [{"input_ids": _ids(step), "labels": _ids(step)} for step in range(4)]
    curves = [adamw_curve(m, batches) for m in models]
    assert curves[0] == pytest.approx(curves[1], rel=1e-5)
    for (n, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    q = models[1].model.layers[0].self_attn.q_proj
    assert q.siblings.group_of(q)  # it did group


def test_gradient_checkpointing_recomputes_the_way_the_forward_computed():
    """A forward and its recomputation must save the same tensors: the first forward observes (alone),
    and its recomputation in backward, after the groups are known, must still run alone."""
    m = _model()
    m.train()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = _model()
    ref.train()
    for step in range(3):
        ids = _ids(step)
        for model in (m, ref):
            model(input_ids=ids, labels=ids).loss.backward()
    for (n, a), (_, b) in zip(m.named_parameters(), ref.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)


class _ThreeHeads(nn.Module):
    """Three sibling projections; `split` feeds the third one another tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(8, 4)
        self.split = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x * 2 if self.split else x
        return torch.cat([self.a(x), self.b(x), self.c(z)], -1)


def _three(kind: str = "lora", fused: bool = True) -> nn.Module:
    torch.manual_seed(0)
    m = _ThreeHeads()
    adarank.inject(m, kind, r=2, alpha=4.0, targets=["a", "b", "c"], fused=fused)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return m


def test_a_sibling_called_on_another_tensor_dissolves_the_group(monkeypatch):
    m, ref = _three(), _three(fused=False)
    calls = _group_calls(monkeypatch)
    x = torch.randn(5, 8)
    for _ in range(2):
        m(x)
    assert calls == [3]
    m.split = ref.split = True
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x))  # c's kept output is not taken: c computes alone
        assert m.a.siblings.dissolved
        torch.testing.assert_close(m(x), ref(x))
    assert calls == [3, 3]  # the group call that found out, then never again


def test_the_groups_follow_the_observed_inputs():
    m = _three()
    m.split = True
    x = torch.randn(5, 8)
    m(x)
    assert m.a.siblings.group_of(m.b) == (m.a, m.b) and m.a.siblings.group_of(m.c) == ()


def test_dropout_at_work_keeps_adapters_alone_and_eval_groups_them(monkeypatch):
    m = _model(dropout=0.1)
    calls = _group_calls(monkeypatch)
    ids = _ids()
    m.train()
    for _ in range(2):
        m(input_ids=ids)
    assert calls == [] and m.model.layers[0].self_attn.q_proj.siblings.groups is None
    m.eval()  # dropout is the identity: group
    for _ in range(2):
        m(input_ids=ids)
    assert calls


def test_a_merged_sibling_computes_alone_and_the_group_stays(monkeypatch):
    m, ref = _three(), _three(fused=False)
    x = torch.randn(5, 8)
    for _ in range(2):
        m(x)
    m.b.merge()
    ref.b.merge()
    calls = _group_calls(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    assert calls == [] and not m.a.siblings.dissolved


def test_a_sibling_pruned_to_rank_zero_stays_in_the_group(monkeypatch):
    m, ref = _three("svd"), _three("svd", fused=False)
    for layer in (m.b, ref.b):
        layer.keep(torch.tensor([], dtype=torch.long))
    calls = _group_calls(monkeypatch)
    x = torch.randn(5, 8, requires_grad=True)
    for _ in range(2):
        y = m(x)
    assert calls == [3]
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)


def test_a_deep_copy_groups_on_its_own_forward_count(monkeypatch):
    m = _three()
    x = torch.randn(5, 8)
    m(x)
    c = copy.deepcopy(m)
    calls = _group_calls(monkeypatch)
    c(x)
    assert calls == [3] and c.a.siblings.clock is not m.a.siblings.clock
    assert c.a.siblings.members[0] is c.a and c.a.siblings.group_of(c.c) == (c.a, c.b, c.c)


def test_unfused_adapters_never_group(monkeypatch):
    m = _model(fused=False)
    calls = _group_calls(monkeypatch)
    for _ in range(2):
        m(input_ids=_ids())
    assert calls == [] and m.model.layers[0].self_attn.q_proj.siblings.groups is None
