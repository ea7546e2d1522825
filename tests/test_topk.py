"""adarank.topk: the global top-K of the final importance scores, and the truncations built from it (in memory,
exported from a model, exported from an adapter folder), loaded by PEFT."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

import adarank
from adarank.export import load_importance, save_importance, truncate_peft
from adarank.schedule import Schedule
from adarank.topk import topk_keep, topk_ranks, truncate_adapter

from conftest import drive, make_batch, svd_bert, tiny_bert

SCH = Schedule(total=12, t_init=2, t_final=3, delta_t=2)  # final mask at t = 9


def test_topk_keeps_the_largest_scores_over_all_modules():
    scores = {"b": torch.tensor([0.5, 3.0, 0.1]), "a": torch.tensor([2.0, 0.2]), "c": torch.tensor([1.0])}
    keep = topk_keep(scores, 3)
    assert list(keep) == ["b", "a", "c"]  # the caller's order
    assert [k.tolist() for k in keep.values()] == [[False, True, False], [True, False], [True]]
    assert topk_ranks(scores, 1) == {"b": 1, "a": 0, "c": 0}
    assert topk_ranks(scores, 6) == {"b": 3, "a": 2, "c": 1}


def test_ties_are_broken_by_module_name_then_position_whatever_the_order():
    scores = {"m2": torch.ones(3), "m1": torch.tensor([1.0, 5.0, 1.0])}
    expected = {"m1": [True, True, False], "m2": [False, False, False]}
    for order in (scores, dict(reversed(list(scores.items())))):
        assert {n: k.tolist() for n, k in topk_keep(order, 2).items()} == expected
    assert topk_ranks(scores, 4) == {"m2": 1, "m1": 3}


@pytest.mark.parametrize("budget", [0, 6, -1, True, 2.0])
def test_a_budget_outside_the_scored_triplets_is_refused(budget):
    with pytest.raises(ValueError, match=r"^budget: must be an int in \[1, 5\]"):
        topk_keep({"a": torch.ones(2), "b": torch.ones(3)}, budget)


def test_a_score_that_is_not_finite_is_refused():
    with pytest.raises(ValueError, match="^scores: the importance of b is not finite"):
        topk_keep({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}, 1)


def trained_svd_model(shrink: bool):
    """A tiny SVD BERT through the allocator's whole schedule (44 triplets down to 22)."""
    model, _ = svd_bert()
    layers = adarank.svd_adapters(model)
    alloc = adarank.RankAllocator(layers, SCH, 22, shrink_at_final=shrink)
    for t in range(1, SCH.total + 1):
        drive(layers, t)
        alloc.step()
        alloc.maybe_shrink(None)
    return model, alloc


@pytest.mark.parametrize("shrink", [True, False])
def test_final_importance_scores_the_kept_triplets_and_survives_a_resume(shrink):
    model, alloc = trained_svd_model(shrink)
    scores = alloc.final_importance()
    live = {n: int((m.lam != 0).sum()) for n, m in adarank.svd_adapters(model)}
    assert {n: s.numel() for n, s in scores.items()} == live and sum(live.values()) == 22
    # the final allocation kept the 22 best: the top-22 of its own scores keeps everything
    assert topk_ranks(scores, 22) == live
    fresh, _ = svd_bert()
    again = adarank.RankAllocator(adarank.svd_adapters(fresh), SCH, 22, shrink_at_final=shrink)
    again.load_state_dict(alloc.state_dict())
    assert torch.equal(again.final_scores, alloc.final_scores)


def test_truncations_in_memory_from_the_model_and_from_the_folder_agree_and_load_in_peft(tmp_path):
    model, alloc = trained_svd_model(shrink=True)
    scores = alloc.final_importance()
    base = tiny_bert()  # the base svd_bert wrapped (same seed)
    adarank.export_peft(model, str(tmp_path / "full"), modules_to_save=["classifier"])
    save_importance(str(tmp_path / "full"), scores)
    assert {n: s.tolist() for n, s in load_importance(str(tmp_path / "full")).items()} == \
        {n: s.tolist() for n, s in scores.items() if s.numel()}
    from_model = adarank.export_peft(model, str(tmp_path / "k7"), modules_to_save=["classifier"], scores=scores, budget=7)
    from_folder = truncate_peft(str(tmp_path / "full"), str(tmp_path / "k7b"), 7)
    assert sum(from_model.values()) == sum(from_folder.values()) == 7
    assert {n: r for n, r in from_model.items() if r} == {n: r for n, r in from_folder.items() if r}
    truncated = copy.deepcopy(model)
    ranks = truncate_adapter(truncated, scores, 7)
    assert ranks == from_model and sum(int((m.lam != 0).sum()) for _, m in adarank.svd_adapters(truncated)) == 7
    cfg = json.loads((tmp_path / "k7" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(n for n, r in ranks.items() if r)  # rank 0: left out
    batch = make_batch()
    with torch.no_grad():
        want = truncated(**batch).logits
        assert (want - model(**batch).logits).abs().max() > 1e-4  # the truncation changes the function
        for folder in ("k7", "k7b"):
            loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / folder)).eval()
            torch.testing.assert_close(loaded(**batch).logits, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="^scores: no score for"):
        adarank.export_peft(model, str(tmp_path / "x"), scores=dict(list(scores.items())[1:]), budget=3)
    with pytest.raises(ValueError, match="^export_peft: give scores and budget together"):
        adarank.export_peft(model, str(tmp_path / "x"), budget=3)
