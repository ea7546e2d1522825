"""adarank.orth: the orthogonal regulariser against PEFT's loss and against a per-layer loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from peft import AdaLoraConfig, get_peft_model

import adarank
from adarank.schedule import Schedule

from conftest import BERT_TARGETS, drive, make_batch, svd_bert, tiny_bert


def loop_norms(layers) -> list[torch.Tensor]:
    """‖PᵀP − I‖_F and ‖QQᵀ − I‖_F of every layer, one at a time, in float64."""
    out = []
    for m in layers:
        P, Q = m.P.double(), m.Q.double()
        out.append(torch.linalg.norm(P.T @ P - torch.eye(m.r, dtype=torch.float64)))
        out.append(torch.linalg.norm(Q @ Q.T - torch.eye(m.r, dtype=torch.float64)))
    return out


def trained_layers(seed: int = 0):
    model, _ = svd_bert(seed=seed)
    layers = adarank.svd_adapters(model)
    for t in range(1, 3):
        drive(layers, t, scale=0.3)
    model.zero_grad(set_to_none=True)  # drive() leaves random gradients behind
    return model, [m for _, m in layers]


def test_mean_norm_equals_peft_forward_loss():
    """PEFT adds orth_reg_weight · mean over every lora_A and lora_B of ‖cov − I‖_F to the loss inside
    its forward; that difference is our mean_norm (float32 sums in another order: 1e-6 relative)."""
    base = tiny_bert()
    w = 0.7
    peft_model = get_peft_model(
        copy.deepcopy(base),
        AdaLoraConfig(init_r=4, target_r=2, total_step=10, orth_reg_weight=w, target_modules=BERT_TARGETS),
    )
    model, layers = trained_layers()
    with torch.no_grad():
        for name, m in adarank.svd_adapters(model):
            pl = peft_model.base_model.model.get_submodule(name)
            pl.lora_A["default"].copy_(m.Q)
            pl.lora_E["default"].copy_(m.lam.view(-1, 1))
            pl.lora_B["default"].copy_(m.P)
    batch = make_batch()
    with torch.no_grad():
        plain = peft_model.base_model.model(**batch).loss
        with_orth = peft_model.base_model(**batch).loss  # AdaLoraModel.forward adds the penalty
    ours = adarank.orth_penalty(layers, "mean_norm")
    assert ours.item() > 0.5
    torch.testing.assert_close(((with_orth - plain) / w).double(), ours.double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(ours.double(), torch.stack(loop_norms(layers)).mean(), rtol=1e-6, atol=0)


def test_sum_sq_is_the_papers_sum_of_squares():
    _, layers = trained_layers(1)
    ours = adarank.orth_penalty(layers, "sum_sq")
    expected = sum(n**2 for n in loop_norms(layers))
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("form", ["mean_norm", "sum_sq"])
def test_zero_for_orthonormal_factors_with_finite_gradient(form):
    _, layers = trained_layers()
    with torch.no_grad():
        for m in layers:
            m.P.copy_(torch.linalg.qr(torch.randn(m.out_features, m.r)).Q)  # orthonormal columns
            m.Q.copy_(torch.linalg.qr(torch.randn(m.in_features, m.r)).Q.T)  # orthonormal rows
    value = adarank.orth_penalty(layers, form)
    assert value.item() == pytest.approx(0.0, abs=1e-5)
    value.backward()
    assert all(torch.isfinite(m.P.grad).all() and torch.isfinite(m.Q.grad).all() for m in layers)


@pytest.mark.parametrize("form", ["mean_norm", "sum_sq"])
def test_gradient_flows_to_p_and_q_only(form):
    _, layers = trained_layers()
    adarank.orth_penalty(layers, form).backward()
    ref = [copy.deepcopy(m) for m in layers]
    for m in layers:
        assert m.P.grad is not None and m.P.grad.abs().sum() > 0
        assert m.Q.grad is not None and m.Q.grad.abs().sum() > 0
        assert m.lam.grad is None
    # the batched gradient equals the per-layer loop's
    for m in ref:
        m.P.grad = m.Q.grad = None
    norms = loop_norms(ref)
    total = torch.stack(norms).mean() if form == "mean_norm" else sum(n**2 for n in norms)
    total.backward()
    for m, r in zip(layers, ref):
        torch.testing.assert_close(m.P.grad, r.P.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(m.Q.grad, r.Q.grad, rtol=1e-5, atol=1e-7)


def test_rank_zero_and_mixed_ranks_after_shrink():
    """After a shrink ranks differ per layer (more shape groups) and a rank-0 layer contributes nothing.
    Like PEFT, mean_norm still counts its two empty matrices in the denominator."""
    model, _ = svd_bert()
    layers = adarank.svd_adapters(model)
    alloc = adarank.RankAllocator(layers, Schedule(total=6, t_init=1, t_final=1, delta_t=1), 22)
    dead = layers[2][0]
    for t in range(1, 6):
        drive(layers, t, scale=0.3, skip=(dead,))
        alloc.step()
    alloc.shrink()
    model.zero_grad(set_to_none=True)
    mods = [m for _, m in layers]
    ranks = [m.r for m in mods]
    assert ranks[2] == 0 and len(set(ranks)) > 2
    live = [m for m in mods if m.r > 0]
    norms = loop_norms(live)
    mean = adarank.orth_penalty(mods, "mean_norm")
    torch.testing.assert_close(mean.double(), sum(norms) / (2 * len(mods)), rtol=1e-6, atol=0)
    sum_sq = adarank.orth_penalty(mods, "sum_sq")
    torch.testing.assert_close(sum_sq.double(), sum(n**2 for n in norms), rtol=1e-6, atol=0)
    mean.backward()
    assert mods[2].P.grad is None
    assert adarank.orth_penalty([mods[2]]).item() == 0.0


def test_unknown_form():
    _, layers = trained_layers()
    with pytest.raises(ValueError, match="method.orth_form"):
        adarank.orth_penalty(layers, "fro")


@pytest.mark.parametrize("form", ["mean_norm", "sum_sq"])
def test_orth_grad_equals_autograd_of_the_penalty(form):
    """orth_grad_ adds exactly the gradient that backpropagating weight * orth_penalty would."""
    from adarank.orth import orth_grad_

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 6), nn.Linear(6, 5))
    layers = [adarank.SVDLinear(m, r=3, alpha=4.0) for m in base]
    for layer in layers:
        layer.lam.data.normal_()
    weight = 0.3
    ref = weight * adarank.orth_penalty(layers, form)
    ref.backward()
    want = {id(p): p.grad.clone() for layer in layers for p in (layer.P, layer.Q)}
    for layer in layers:
        for p in (layer.P, layer.Q):
            p.grad = torch.ones_like(p)  # existing gradients are added to, not replaced
    value = orth_grad_(layers, weight, form)
    assert value.item() == pytest.approx(ref.item() / weight, rel=1e-6)
    for layer in layers:
        for p in (layer.P, layer.Q):
            torch.testing.assert_close(p.grad, want[id(p)] + 1, rtol=1e-5, atol=1e-6)
    # None gradients are created
    for layer in layers:
        layer.P.grad = layer.Q.grad = None
    orth_grad_(layers, weight, form)
    for layer in layers:
        torch.testing.assert_close(layer.P.grad, want[id(layer.P)], rtol=1e-5, atol=1e-6)
