"""adarank.allocation: the Allocator contract, checked on both AdaLoRA implementations the loop drives."""

from __future__ import annotations

import inspect

import pytest
import torch

import adarank
from adarank.allocation import Allocation, Allocator
from adarank.increlora import IncreLoraAllocator
from adarank.runner.config import MethodConfig, ModelConfig
from adarank.runner.methods import apply_method, build_allocator
from adarank.runner.peft_baselines import PeftAllocator

from conftest import BERT_TARGETS, make_batch, svd_bert, tiny_bert

MEMBERS = ("step", "maybe_shrink", "state_dict", "load_state_dict")


def _conforms(cls: type) -> list[str]:
    """What `cls` lacks or spells differently from the protocol (a static check of the signatures)."""
    problems = []
    for name in MEMBERS:
        want, have = getattr(Allocator, name), getattr(cls, name, None)
        if have is None:
            problems.append(f"{name}: missing")
            continue
        wp = list(inspect.signature(want).parameters)
        hp = list(inspect.signature(have).parameters)
        if hp[: len(wp)] != wp or any(inspect.signature(have).parameters[p].default is inspect.Parameter.empty
                                      for p in hp[len(wp):]):
            problems.append(f"{name}{inspect.signature(have)} is not {name}{inspect.signature(want)}")
    return problems


@pytest.mark.parametrize("cls", [adarank.RankAllocator, PeftAllocator, IncreLoraAllocator])
def test_both_allocators_satisfy_the_protocol(cls):
    assert _conforms(cls) == []


def test_the_static_check_rejects_a_class_that_does_not_conform():
    class Wrong:
        def step(self, t):  # no update_importance
            ...

        def state_dict(self):
            ...

    problems = _conforms(Wrong)
    assert problems[0].startswith("step(self, t) is not step(self, update_importance")
    assert problems[1:] == ["maybe_shrink: missing", "load_state_dict: missing"]
    assert not isinstance(Wrong(), Allocator)


def test_the_allocators_the_builders_make_are_allocators_at_run_time():
    model, _ = svd_bert()
    ours = adarank.RankAllocator(adarank.svd_adapters(model), adarank.make_schedule(20, 0.1, 0.2, 2), 11)
    assert isinstance(ours, Allocator)
    m = MethodConfig(name="peft_adalora", r=2)
    model_cfg = ModelConfig(name="x", name_or_path="random", targets=BERT_TARGETS, train_modules=["classifier"])
    theirs = build_allocator(apply_method(tiny_bert(), m, model_cfg), m, 50)
    assert isinstance(theirs, Allocator) and isinstance(theirs, PeftAllocator)


def _hand_offs(shrink_at_final: bool) -> tuple[list[bool], list]:
    model, _ = svd_bert()
    layers = adarank.svd_adapters(model)
    alloc = adarank.RankAllocator(layers, adarank.make_schedule(10, 0.0, 0.5, 1), 11, shrink_at_final=shrink_at_final)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    replaced = []
    for _ in range(10):  # the final mask is fixed at step 5
        model(**make_batch()).loss.backward()
        opt.step()
        alloc.step()
        replaced.append(alloc.maybe_shrink(opt))
        opt.zero_grad()
    return replaced, [m.r for _, m in layers]


def test_maybe_shrink_is_the_one_shrink_hand_off():
    replaced, ranks = _hand_offs(shrink_at_final=True)
    # exactly once, at the step that fixed the final mask; the adapters then hold the final budget
    assert replaced == [False] * 4 + [True] + [False] * 5 and sum(ranks) == 11
    replaced, ranks = _hand_offs(shrink_at_final=False)
    assert replaced == [False] * 10 and ranks == [4] * 11  # masked only


def test_allocation_from_mask_counts_each_modules_triplets():
    mask = torch.tensor([True, False, True, True, False, False])
    a = Allocation.from_mask(3, 3, mask, [2, 3, 1], ["a", "b", "c"])
    assert a.rank_dict() == {"a": 1, "b": 2, "c": 0} and (a.step, a.budget, a.phase, a.masked) == (3, 3, "budget", True)
