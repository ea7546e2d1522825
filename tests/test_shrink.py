"""adarank.shrink: removing pruned triplets keeps the function, slices AdamW state, and training goes on."""

from __future__ import annotations

import pytest
import torch

import adarank
from adarank.schedule import Schedule

from conftest import make_batch, svd_bert

SCH = Schedule(total=10, t_init=1, t_final=3, delta_t=1)  # final mask at t = 7


def run_to(steps: int, lr: float = 5e-2):
    model, _ = svd_bert()
    layers = adarank.svd_adapters(model)
    alloc = adarank.RankAllocator(layers, SCH, 22)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = make_batch()
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        alloc.step()
        opt.zero_grad()
    return model, layers, alloc, opt, batch


def test_shrink_keeps_logits_and_slices_adamw_state():
    model, layers, alloc, opt, batch = run_to(8)
    assert alloc.frozen
    masks = [mk.clone() for mk in alloc.module_masks()]
    old = {(n, role): getattr(m, role) for n, m in layers for role in ("P", "lam", "Q")}
    old_state = {k: {s: v.clone() for s, v in opt.state[p].items()} for k, p in old.items()}
    with torch.no_grad():
        before = model(**batch).logits
    alloc.shrink(opt)
    with torch.no_grad():
        after = model(**batch).logits
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)

    dims = {"P": 1, "lam": 0, "Q": 0}
    opt_params = {id(p) for g in opt.param_groups for p in g["params"]}
    for (n, m), mk in zip(layers, masks):
        keep = mk.nonzero().flatten()
        r = int(mk.sum())
        assert m.r == r and m.P.shape == (16 if "intermediate" not in n else 32, r)
        assert m.lam.shape == (r,) and m.Q.shape[0] == r
        assert (m.lam != 0).all()  # only live triplets are left
        for role, dim in dims.items():
            new_p, old_p = getattr(m, role), old[(n, role)]
            assert new_p is not old_p
            assert torch.equal(new_p, old_p.index_select(dim, keep))
            assert id(old_p) not in opt_params
            if r == 0:  # pruned to rank 0: empty, frozen, and dropped from the optimizer
                assert not new_p.requires_grad and id(new_p) not in opt_params and new_p not in opt.state
                continue
            assert new_p.requires_grad and id(new_p) in opt_params
            st, ost = opt.state[new_p], old_state[(n, role)]
            assert set(st) == set(ost) == {"step", "exp_avg", "exp_avg_sq"}
            assert torch.equal(st["step"], ost["step"])
            for k in ("exp_avg", "exp_avg_sq"):
                assert st[k].shape == new_p.shape
                assert torch.equal(st[k], ost[k].index_select(dim, keep))
    assert len(opt.state) == len([p for p in model.parameters() if p.requires_grad])
    assert sum(m.r for _, m in layers) == 22


def test_training_continues_after_shrink():
    model, layers, alloc, opt, batch = run_to(8)
    alloc.shrink(opt)
    snap = [p.detach().clone() for _, m in layers for p in (m.P, m.lam, m.Q)]
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        a = alloc.step()
        opt.zero_grad()
        losses.append(loss.item())
        assert a.phase == "final" and a.ranks.tolist() == [m.r for _, m in layers]
    assert all(torch.isfinite(torch.tensor(losses)))
    after = [p for _, m in layers for p in (m.P, m.lam, m.Q)]
    assert all(not torch.equal(a, b) for a, b in zip(after, snap) if a.numel())
    assert losses[-1] < losses[0]


def test_shrink_twice_is_a_no_op_and_without_optimizer_works():
    model, layers, alloc, _, batch = run_to(7)
    alloc.shrink()
    shapes = [m.P.shape for _, m in layers]
    params = [m.P for _, m in layers]
    alloc.shrink()
    assert [m.P.shape for _, m in layers] == shapes and all(m.P is p for (_, m), p in zip(layers, params))


@pytest.mark.parametrize("steps", [0, 1, 4, 6])
def test_shrink_before_the_final_mask_raises(steps):
    model, layers, alloc, opt, _ = run_to(steps)
    with pytest.raises(RuntimeError, match="final budget"):
        alloc.shrink(opt)
    assert all(m.r == 4 for _, m in layers)


def test_shrink_and_mask_train_identically_without_the_regulariser():
    """Shrinking changes nothing but shapes: with orth_weight = 0, training after a shrink follows the
    masked model exactly (the regulariser is the one intended difference; see adarank/shrink.py)."""

    def trajectory(shrink: bool) -> dict[str, torch.Tensor]:
        model, layers, alloc, opt, batch = run_to(8)
        if shrink:
            alloc.shrink(opt)
        for _ in range(4):
            model(**batch).loss.backward()
            opt.step()
            alloc.step()
            opt.zero_grad()
        return {n: m.delta_weight().detach() for n, m in layers}

    masked, shrunk = trajectory(False), trajectory(True)
    for n in masked:
        torch.testing.assert_close(shrunk[n], masked[n], rtol=1e-5, atol=1e-7)
