"""adarank.increlora: the reference's module score, the growth rule, the exact budget, and resuming."""

from __future__ import annotations

import math

import pytest
import torch

import adarank
from adarank.allocation import Allocator
from adarank.increlora import IncreLoraAllocator, growth_rounds
from adarank.schedule import Schedule

from conftest import drive, make_batch, randomize_lams, svd_bert

SCH = Schedule(total=20, t_init=2, t_final=4, delta_t=2)  # growth steps t = 4, 6, ..., 16


def _grads_of_delta_w(model, layers):
    """One forward/backward; ∂L/∂ΔW of every layer from its input and output gradient (y = ... + x·ΔWᵀ)."""
    seen, handles = {}, []
    for name, m in layers:
        def hook(mod, args, out, name=name):
            x = args[0].detach()
            out.register_hook(lambda g: seen.__setitem__(name, g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])))
        handles.append(m.register_forward_hook(hook))
    model(**make_batch()).loss.backward()
    for h in handles:
        h.remove()
    return seen


def test_the_score_is_the_references_with_the_abs_after_a_row_or_column_sum():
    model, _ = svd_bert(r=3)
    randomize_lams(model)
    layers = adarank.svd_adapters(model)
    G = _grads_of_delta_w(model, layers)
    alloc = IncreLoraAllocator(layers, SCH, 40, top_h=3)
    got = alloc.module_sensitivity()
    for k, (name, m) in enumerate(layers):
        prod = (m.delta_weight().double() * G[name].double())
        norm = math.sqrt(m.out_features * m.in_features)
        want = (prod.sum(1).abs().sum() + prod.sum(0).abs().sum()) / (2 * norm)
        assert got[k].item() == pytest.approx(want.item(), rel=1e-5)
        assert got[k] <= prod.abs().sum() / norm + 1e-12  # the reference's Σ|ΔW ⊙ G| / √(out·in) bounds it
    assert (got > 0).all()


def _run(alloc, layers, steps):
    out = []
    for t in range(alloc.t + 1, alloc.t + 1 + steps):
        drive(layers, t)
        a = alloc.step()
        out.append((a, alloc.maybe_shrink(None)))
    return out


def test_growth_adds_top_h_modules_every_delta_t_and_stops_at_the_budget_exactly():
    model, _ = svd_bert(r=1)
    layers = adarank.svd_adapters(model)
    alloc = IncreLoraAllocator(layers, SCH, target_total=21, top_h=3, grow_by=3)
    assert isinstance(alloc, Allocator) and alloc.init_total == 11 and growth_rounds(SCH) == 7
    steps = _run(alloc, layers, 20)
    grew = [a.step for a, replaced in steps if replaced]
    assert grew == [4, 6] and [a.step for a, _ in steps if a.masked] == grew
    # t = 4: three modules gain 3 each (20); t = 6: only one triplet is left, so one module gains 1
    assert [a.budget for a, _ in steps] == [11] * 3 + [20] * 2 + [21] * 15
    assert [a.phase for a, _ in steps][:7] == ["init", "init", "budget", "budget", "budget", "budget", "final"]
    ranks = [m.r for _, m in layers]
    # 3 + 3 + 3 at t = 4, then + 1 to a fourth module or to one of the three
    assert sum(ranks) == 21 and sorted(r - 1 for r in ranks if r > 1) in ([1, 3, 3, 3], [3, 3, 4])
    last = steps[-1][0]
    assert last.rank_dict() == dict(zip(alloc.names, ranks))
    # the mask alone says each module's rank: its first r of min(out, in) entries
    assert last.mask.numel() == sum(min(m.out_features, m.in_features) for _, m in layers)


def test_the_chosen_modules_are_the_highest_scores():
    model, _ = svd_bert(r=1)
    layers = adarank.svd_adapters(model)
    alloc = IncreLoraAllocator(layers, Schedule(total=10, t_init=0, t_final=2, delta_t=2), 25, top_h=4)
    drive(layers, 1)
    alloc.step()
    drive(layers, 2)
    a = alloc.step()
    scores = alloc.scores()
    want = set(torch.topk(scores, 4).indices.tolist())
    alloc.maybe_shrink(None)
    assert {i for i, (_, m) in enumerate(layers) if m.r == 2} == want
    assert a.threshold == scores[sorted(want, key=lambda i: -scores[i])[-1]]


def test_a_window_too_short_for_the_budget_is_refused_naming_top_h():
    model, _ = svd_bert(r=1)
    with pytest.raises(ValueError, match=r"^method\.top_h: 7 growth steps .* at most 7 triplets, short of the 10"):
        IncreLoraAllocator(adarank.svd_adapters(model), SCH, 21, top_h=1)
    with pytest.raises(ValueError, match=r"^method\.r: the budget 5 must be in \[11, "):
        IncreLoraAllocator(adarank.svd_adapters(model), SCH, 5)


def test_a_loaded_state_regrows_the_layers_and_continues_identically():
    model, _ = svd_bert(r=1)
    layers = adarank.svd_adapters(model)
    alloc = IncreLoraAllocator(layers, SCH, 24, top_h=2)
    _run(alloc, layers, 7)  # grown at 4 and 6
    state = alloc.state_dict()
    assert sum(state["sizes"]) == 15 and state["ema_ipt"] is not None

    twin, _ = svd_bert(r=1)
    twin_layers = adarank.svd_adapters(twin)
    resumed = IncreLoraAllocator(twin_layers, SCH, 24, top_h=2)
    resumed.load_state_dict(state)
    assert [m.r for _, m in twin_layers] == state["sizes"]
    with torch.no_grad():  # the checkpoint's weights, as the runner loads them after the allocator
        for (_, a), (_, b) in zip(layers, twin_layers):
            for n in ("P", "lam", "Q"):
                getattr(b, n).copy_(getattr(a, n))
    for (a, ra), (b, rb) in zip(_run(alloc, layers, 10), _run(resumed, twin_layers, 10)):
        assert (a.step, a.budget, a.masked, ra) == (b.step, b.budget, b.masked, rb) and torch.equal(a.mask, b.mask)
    assert all(torch.equal(a.P, b.P) and torch.equal(a.Q, b.Q) for (_, a), (_, b) in zip(layers, twin_layers))
