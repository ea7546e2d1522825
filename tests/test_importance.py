"""adarank.importance: each pure function against the formula written out by hand."""

from __future__ import annotations

import pytest
import torch

from adarank import importance as imp


def tensors(seed: int, shapes=((3, 4), (5,), (2, 3, 2))) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def test_sensitivity_is_abs_theta_times_grad():
    params, grads = tensors(0), tensors(1)
    out = imp.sensitivity(params, grads)
    for o, p, g in zip(out, params, grads):
        assert torch.equal(o, (p * g).abs())
        assert (o >= 0).all()
    assert all(torch.equal(p, q) for p, q in zip(params, tensors(0)))  # inputs untouched


def test_sensitivity_pinned_numbers():
    out = imp.sensitivity([torch.tensor([2.0, -3.0, 0.5])], [torch.tensor([-1.0, -2.0, 4.0])])
    assert out[0].tolist() == [2.0, 6.0, 2.0]


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.85])
def test_smooth_is_in_place_ema(beta):
    ema, value = tensors(2), tensors(3)
    expected = [beta * e + (1 - beta) * v for e, v in zip(ema, value)]
    ids = [id(e) for e in ema]
    imp.smooth_(ema, value, beta)
    assert [id(e) for e in ema] == ids
    for e, x in zip(ema, expected):
        assert torch.equal(e, x)


def test_smooth_pinned_numbers():
    ema = [torch.tensor([1.0, 2.0])]
    imp.smooth_(ema, [torch.tensor([3.0, 0.0])], 0.75)
    assert ema[0].tolist() == [1.5, 1.5]


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.85])
def test_uncertainty_is_ema_of_abs_deviation(beta):
    unc, ipt, ipt_ema = tensors(4), [t.abs() for t in tensors(5)], [t.abs() for t in tensors(6)]
    unc = [u.abs() for u in unc]
    expected = [beta * u + (1 - beta) * (i - e).abs() for u, i, e in zip(unc, ipt, ipt_ema)]
    imp.uncertainty_(unc, ipt, ipt_ema, beta)
    for u, x in zip(unc, expected):
        assert torch.equal(u, x)


def test_uncertainty_pinned_numbers():
    unc = [torch.tensor([1.0, 0.0])]
    imp.uncertainty_(unc, [torch.tensor([1.0, 5.0])], [torch.tensor([3.0, 1.0])], 0.5)
    assert unc[0].tolist() == [1.5, 2.0]


def test_element_score():
    ipt, unc = tensors(7), tensors(8)
    for s, i, u in zip(imp.element_score(ipt, unc, "uncertainty"), ipt, unc):
        assert torch.equal(s, i * u)
    for s, i in zip(imp.element_score(ipt, unc, "sensitivity"), ipt):
        assert torch.equal(s, i)
    with pytest.raises(ValueError, match="allocator.score"):
        imp.element_score(ipt, unc, "magnitude")


def test_triplet_score_is_lam_plus_row_mean_of_q_plus_column_mean_of_p():
    g = torch.Generator().manual_seed(9)
    G, out_f, r, in_f = 3, 5, 4, 6
    s_lam = torch.rand(G, r, generator=g)
    s_P = torch.rand(G, out_f, r, generator=g)
    s_Q = torch.rand(G, r, in_f, generator=g)
    got = imp.triplet_score(s_lam, s_P, s_Q)
    assert got.shape == (G, r)
    for m in range(G):
        for i in range(r):
            row_q = sum(s_Q[m, i, j] for j in range(in_f)) / in_f
            col_p = sum(s_P[m, j, i] for j in range(out_f)) / out_f
            expected = s_lam[m, i] + row_q + col_p
            assert got[m, i].item() == pytest.approx(expected.item(), rel=1e-6)


def test_triplet_score_pinned_numbers():
    s_lam = torch.tensor([[1.0, 0.0]])
    s_P = torch.tensor([[[1.0, 0.0], [3.0, 4.0]]])  # (1, out=2, r=2): column means 2, 2
    s_Q = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]]])  # (1, r=2, in=3): row means 2, 2
    assert imp.triplet_score(s_lam, s_P, s_Q).tolist() == [[5.0, 4.0]]


def test_scores_list():
    assert imp.SCORES == ("uncertainty", "sensitivity", "magnitude")
