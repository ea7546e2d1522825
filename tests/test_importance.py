"""adarank.importance: each pure function against the formula written out by hand."""

from __future__ import annotations

import pytest
import torch

from adarank import importance as imp


def tensors(seed: int, shapes=((3, 4), (5,), (2, 3, 2))) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def test_sensitivity_is_abs_theta_times_grad():
    for p, g in zip(tensors(0), tensors(1)):
        p0 = p.clone()
        o = imp.sensitivity(p, g)
        assert torch.equal(o, (p * g).abs())
        assert (o >= 0).all()
        assert torch.equal(p, p0)  # inputs untouched


def test_sensitivity_pinned_numbers():
    out = imp.sensitivity(torch.tensor([2.0, -3.0, 0.5]), torch.tensor([-1.0, -2.0, 4.0]))
    assert out.tolist() == [2.0, 6.0, 2.0]


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.85])
def test_smooth_is_in_place_ema(beta):
    for e, v in zip(tensors(2), tensors(3)):
        expected = beta * e + (1 - beta) * v
        ptr = e.data_ptr()
        imp.smooth_(e, v, beta)
        assert e.data_ptr() == ptr
        assert torch.equal(e, expected)


def test_smooth_pinned_numbers():
    ema = torch.tensor([1.0, 2.0])
    imp.smooth_(ema, torch.tensor([3.0, 0.0]), 0.75)
    assert ema.tolist() == [1.5, 1.5]


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.85])
def test_uncertainty_is_ema_of_abs_deviation(beta):
    for u, i, e in zip(tensors(4), tensors(5), tensors(6)):
        u, i, e = u.abs(), i.abs(), e.abs()
        expected = beta * u + (1 - beta) * (i - e).abs()
        imp.uncertainty_(u, i, e, beta)
        assert torch.equal(u, expected)


def test_uncertainty_pinned_numbers():
    unc = torch.tensor([1.0, 0.0])
    imp.uncertainty_(unc, torch.tensor([1.0, 5.0]), torch.tensor([3.0, 1.0]), 0.5)
    assert unc.tolist() == [1.5, 2.0]


def test_element_score():
    for i, u in zip(tensors(7), tensors(8)):
        assert torch.equal(imp.element_score(i, u, "uncertainty"), i * u)
        assert torch.equal(imp.element_score(i, u, "sensitivity"), i)
        with pytest.raises(ValueError, match="method.score"):
            imp.element_score(i, u, "magnitude")


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
