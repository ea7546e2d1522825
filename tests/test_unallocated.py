"""adarank.unallocated: SVD adapters training with no allocator warn once; with one (as the runner builds it), never."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest

import adarank
from adarank.unallocated import MESSAGE

from conftest import make_batch, svd_bert
from e2e import run, tiny_config


def unallocated_warnings(record) -> list[warnings.WarningMessage]:
    return [w for w in record if str(w.message) == MESSAGE]


def test_training_svd_adapters_without_an_allocator_warns_once_at_the_first_training_forward():
    model, _ = svd_bert()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.eval()
        model(**make_batch())  # evaluation needs no allocator
        assert unallocated_warnings(record) == []
        model.train()
        for _ in range(3):
            model(**make_batch())
    (w,) = unallocated_warnings(record)
    assert w.category is UserWarning
    # warned and gone: no adapter runs a hook any more
    assert all(not m._forward_pre_hooks for _, m in adarank.svd_adapters(model))


def test_an_allocator_built_before_training_removes_the_warning():
    model, _ = svd_bert()
    adarank.RankAllocator(adarank.svd_adapters(model), adarank.make_schedule(10, 0.1, 0.2), target_total=10)
    assert all(not m._forward_pre_hooks for _, m in adarank.svd_adapters(model))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.train()
        model(**make_batch())
    assert unallocated_warnings(record) == []


def test_lora_adapters_are_not_watched():
    from conftest import BERT_TARGETS, tiny_bert

    model = tiny_bert()
    adarank.inject(model, "lora", r=2, alpha=2.0, targets=BERT_TARGETS)
    assert all(not m._forward_pre_hooks for _, m in adarank.adapters(model))


def test_a_copied_model_keeps_its_own_watch():
    model, _ = svd_bert()
    clone = copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))  # the hooks are plain objects, not closures
    adarank.RankAllocator(adarank.svd_adapters(clone), adarank.make_schedule(10, 0.1, 0.2), target_total=10)
    assert all(not m._forward_pre_hooks for _, m in adarank.svd_adapters(clone))
    assert all(m._forward_pre_hooks for _, m in adarank.svd_adapters(model))  # the original still warns


#: every runner method that builds SVD adapters (svd on purpose without an allocator)
SVD_METHODS = [["method=adalora"], ["method=increlora", "method.delta_t=1"], ["method=svd"], ["method=sora"],
               ["method=sora_fixed"]]


@pytest.mark.parametrize("method", SVD_METHODS)
def test_the_runner_never_triggers_it(tmp_path, method):  # the runner's methods with SVD adapters
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        run(tiny_config(tmp_path, *method, "train.max_steps=3", "data.max_train_samples=8",
                       "data.max_eval_samples=8"), tmp_path / "out")
    assert unallocated_warnings(record) == []
