"""adarank.grow: new triplets keep the function, the optimizer state grows with zeros, old entries stay."""

from __future__ import annotations

import torch

import adarank
from adarank.grow import grow_layers, pad_optimizer

from conftest import make_batch, randomize_lams, svd_bert


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_growing_keeps_the_function_and_adds_the_triplets():
    model, _ = svd_bert(r=2)
    randomize_lams(model)
    layers = [m for _, m in adarank.svd_adapters(model)]
    batch = make_batch()
    before = _logits(model, batch)
    old = [(m.P.detach().clone(), m.lam.detach().clone(), m.Q.detach().clone()) for m in layers]
    counts = [i % 3 for i in range(len(layers))]  # 0, 1 or 2 new triplets
    growths = grow_layers(layers, counts, seed=7)
    assert len(growths) == 3 * sum(1 for c in counts if c)
    for m, (P, lam, Q), k in zip(layers, old, counts):
        assert m.r == 2 + k and m.P.shape == (m.out_features, 2 + k) and m.Q.shape == (2 + k, m.in_features)
        assert torch.equal(m.P[:, :2], P) and torch.equal(m.lam[:2], lam) and torch.equal(m.Q[:2], Q)
        assert torch.equal(m.lam[2:], torch.zeros(k))  # λ = 0: the new triplets compute nothing yet
        if k:
            assert 0.005 < m.P[:, 2:].std() < 0.05 and 0.005 < m.Q[2:].std() < 0.05  # N(0, 0.02)
    torch.testing.assert_close(_logits(model, batch), before, rtol=0, atol=1e-6)
    # the same seed draws the same triplets (every process, and a resumed run)
    again, _ = svd_bert(r=2)
    twin = [m for _, m in adarank.svd_adapters(again)]
    grow_layers(twin, counts, seed=7)
    assert all(torch.equal(a.P, b.P) and torch.equal(a.Q, b.Q) for a, b in zip(layers, twin))


def test_the_optimizer_state_grows_with_zeros_and_keeps_its_step():
    model, _ = svd_bert(r=2)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        model(**make_batch()).loss.backward()
        opt.step()
        opt.zero_grad()
    layers = [m for _, m in adarank.svd_adapters(model)]
    grown = layers[1]
    olds = {n: getattr(grown, n) for n in ("P", "lam", "Q")}
    saved = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in olds.items()}
    untouched = layers[0].P
    before_untouched = {k: v.clone() for k, v in opt.state[untouched].items()}
    pad_optimizer(opt, grow_layers(layers, [0, 2] + [0] * (len(layers) - 2), seed=0))

    held = opt.param_groups[0]["params"]
    assert len(held) == len(params) and all(any(getattr(grown, n) is p for p in held) for n in olds)
    assert not any(p is q for p in held for q in olds.values())  # the old tensors are gone
    assert [id(p) for p in held] == [id(p) for p in model.parameters() if p.requires_grad]  # same order
    for n, dim in (("P", 1), ("lam", 0), ("Q", 0)):
        st = opt.state[getattr(grown, n)]
        assert torch.equal(st["step"], saved[n]["step"])
        for key in ("exp_avg", "exp_avg_sq"):
            old_part = st[key].narrow(dim, 0, 2)
            new_part = st[key].narrow(dim, 2, 2)
            assert torch.equal(old_part, saved[n][key]) and not new_part.any()
            assert saved[n][key].any()  # the old moments were nonzero: the check can fail
    assert all(torch.equal(opt.state[untouched][k], v) for k, v in before_untouched.items())
    model(**make_batch()).loss.backward()
    opt.step()  # AdamW steps the grown parameters
    assert grown.lam[2:].abs().sum() > 0


def test_grown_fused_adapters_compute_what_the_plain_ones_do():
    plain, _ = svd_bert(r=1)
    fused, _ = svd_bert(r=1, fused=True)
    for model in (plain, fused):
        layers = [m for _, m in adarank.svd_adapters(model)]
        grow_layers(layers, [i % 3 for i in range(len(layers))], seed=3)
        randomize_lams(model)
    batch = make_batch()
    losses = [model(**batch).loss for model in (plain, fused)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (_, a), (_, b) in zip(adarank.svd_adapters(plain), adarank.svd_adapters(fused)):
        assert b.r == a.r and b.fused and not a.fused
        for n in ("P", "lam", "Q"):
            torch.testing.assert_close(getattr(b, n).grad, getattr(a, n).grad, rtol=1e-4, atol=1e-6)
