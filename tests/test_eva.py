"""EVA against PEFT's (peft.tuners.lora.eva) on the tiny BERT, from the same batches with the same settings.

Pinned: the rank of every module (the redistribution, the equal-input sharing, rank 0) and A up to the sign
of each row, to 1e-5 absolute (the vectors have unit norm; the two differ by float rounding, ~3e-7). PEFT's
SVD is `torch.svd_lowrank(q=2k)`, exact only where 2k reaches the layer's input width (16 here), so the
first comparison uses PEFT as it ships with 2k = 16 on 16-wide inputs, and the second swaps in PEFT's own
IncrementalPCA with its exact SVD (`lowrank=False`) to cover the 32-wide FFN output and rank-0 modules.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, tiny_bert

from adarank.eva import distribute_ranks, eva, token_mask

pytest.importorskip("peft")
import peft.tuners.lora.eva as peft_eva  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora.config import EvaConfig  # noqa: E402
from peft.utils.incremental_pca import IncrementalPCA as PeftIPCA  # noqa: E402

WIDTH16 = ["query", "key", "value", "attention.output.dense", "intermediate.dense"]
ALL = WIDTH16 + ["output.dense"]  # BERT's pooler is left out: PEFT's default input function cannot index its input
ATOL = 1e-5


def _batches(n: int = 6) -> list[dict[str, torch.Tensor]]:
    # no labels: PEFT's label mask broadcasts (B,) sequence labels against the (B, L) attention mask
    return [{k: v for k, v in make_batch(n=4, seq=7, seed=s).items() if k != "labels"} for s in range(n)]


def _names(model, targets) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and any(n.endswith("." + t) for t in targets)]


def _peft_state(targets, r, rho, tau, whiten=False):
    cfg = LoraConfig(r=r, target_modules=targets, init_lora_weights="eva",
                     eva_config=EvaConfig(rho=rho, tau=tau, whiten=whiten))
    return peft_eva.get_eva_state_dict(tiny_bert(), _batches(), peft_config=cfg, show_progress_bar=False)


def _assert_same(ours, theirs: dict[str, torch.Tensor], names: list[str]) -> None:
    assert {n: ours.ranks[n] for n in names} == {n: theirs[n].shape[0] for n in names}
    for n in names:
        a, b = ours.init[n], theirs[n].float()
        sign = torch.sign((a * b).sum(-1, keepdim=True))
        torch.testing.assert_close(sign * a, b, rtol=0, atol=ATOL, msg=n)


@pytest.fixture
def exact_peft_svd(monkeypatch):
    class Exact(PeftIPCA):
        def __init__(self, **kw):
            super().__init__(**{**kw, "lowrank": False})

    monkeypatch.setattr(peft_eva, "IncrementalPCA", Exact)


def test_same_ranks_and_a_as_peft_as_it_ships():
    theirs = _peft_state(WIDTH16, r=2, rho=4.0, tau=0.99)
    names = _names(tiny_bert(), WIDTH16)
    ours = eva(tiny_bert(), names, _batches(), r=2, rho=4.0, tau=0.99)
    _assert_same(ours, theirs, names)
    assert len(set(ours.ranks.values())) > 1 and sum(ours.ranks.values()) == 2 * len(names)  # redistributed
    assert ours.shared["bert.encoder.layer.0.attention.self.key"] == "bert.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize("r,rho,tau", [(1, 8.0, 0.99), (2, 3.0, 0.95)])
def test_same_ranks_and_a_as_peft_with_its_exact_svd(exact_peft_svd, r, rho, tau):
    theirs = _peft_state(ALL, r, rho, tau)
    names = _names(tiny_bert(), ALL)
    ours = eva(tiny_bert(), names, _batches(), r=r, rho=rho, tau=tau)
    _assert_same(ours, theirs, names)
    if r == 1:  # ρ = 8 lets the budget leave layer 0's q, k, v (one shared SVD) at rank 0
        assert [ours.ranks[n] for n in names[:3]] == [0, 0, 0]


def test_whitened_a_as_peft_where_no_input_is_shared(exact_peft_svd):
    targets = ["attention.output.dense", "intermediate.dense", "output.dense"]
    theirs = _peft_state(targets, 2, 2.0, 0.99, whiten=True)
    names = _names(tiny_bert(), targets)
    _assert_same(eva(tiny_bert(), names, _batches(), r=2, rho=2.0, tau=0.99, whiten=True), theirs, names)


def test_whitened_shared_inputs_differ_from_peft_as_documented(exact_peft_svd):
    """PEFT whitens a shared SVD's components in place once per layer sharing it (q, k, v: three times)."""
    targets = ["query", "key", "value"]
    theirs = _peft_state(targets, 2, 4.0, 0.99, whiten=True)
    names = _names(tiny_bert(), targets)
    plain = eva(tiny_bert(), names, _batches(), r=2, rho=4.0, tau=0.99)
    white = eva(tiny_bert(), names, _batches(), r=2, rho=4.0, tau=0.99, whiten=True)
    for n in names:
        sigma = (plain.init[n].norm(dim=-1) / white.init[n].norm(dim=-1)) ** 2  # ours: divided by √σ once
        torch.testing.assert_close(theirs[n].float().norm(dim=-1), sigma ** -1.5, rtol=1e-4, atol=0)


def test_peft_initialize_lora_eva_weights_builds_what_our_init_gives(exact_peft_svd):
    """The PeftModel after initialize_lora_eva_weights: removed modules, A and the adjusted scaling."""
    r, alpha = 1, 4.0
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=ALL, init_lora_weights="eva",
                     eva_config=EvaConfig(rho=8.0, tau=0.99))
    pm = get_peft_model(tiny_bert(), cfg)
    peft_eva.initialize_lora_eva_weights(pm, dataloader=_batches(), show_progress_bar=False)
    names = _names(tiny_bert(), ALL)
    ours = eva(tiny_bert(), names, _batches(), r=r, rho=8.0, tau=0.99)
    mods = dict(pm.base_model.model.named_modules())
    for n in names:
        layer = mods[n]
        if ours.ranks[n] == 0:
            assert not hasattr(layer, "lora_A"), n  # PEFT put the base layer back
            continue
        a = layer.lora_A["default"].weight
        sign = torch.sign((a * ours.init[n]).sum(-1, keepdim=True))
        torch.testing.assert_close(sign * ours.init[n], a, rtol=0, atol=ATOL)
        assert layer.scaling["default"] == pytest.approx(alpha / r)  # α·r_i/r over r_i


def test_token_mask_uses_per_token_labels_only():
    b = make_batch(n=3, seq=5)
    assert torch.equal(token_mask(b, True), b["attention_mask"].bool())  # (B,) sequence labels: not a mask
    b["labels"] = torch.full((3, 5), 1)
    b["labels"][:, 0] = -100
    want = b["attention_mask"].bool().clone()
    want[:, 0] = False
    assert torch.equal(token_mask(b, True), want) and torch.equal(token_mask(b, False), b["attention_mask"].bool())


def test_distribute_ranks_takes_the_largest_ratios_and_the_owner_the_larger_rank():
    ratios = {"a": torch.tensor([0.5, 0.1, 0.05]), "c": torch.tensor([0.3, 0.2, 0.01])}
    # b shares a's SVD: its copies of a's ratios compete as well
    ranks = distribute_ranks(ratios, {"a": "a", "c": "c", "b": "a"}, budget=5, shared={"b": "a"})
    assert sum(ranks.values()) == 5 and ranks["c"] == 2 and ranks["a"] >= ranks["b"] and ranks["a"] + ranks["b"] == 3


def test_not_converging_within_the_passes_allowed_names_the_layers():
    from adarank.eva import EvaNotConverged

    names = _names(tiny_bert(), ["query"])
    with pytest.raises(EvaNotConverged, match="layer.0.attention.self.query.*not converged after 3 forward"):
        eva(tiny_bert(), names, _batches(), r=2, rho=2.0, tau=1.0, max_forwards=3)
