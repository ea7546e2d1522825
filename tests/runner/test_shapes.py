"""adarank.runner.shapes: a compiled run compiles one graph per length bucket (so at most len(buckets)),
more without buckets, runs its short batches eagerly, and records the counts in results.json.

The runs compile with dynamo's "eager" backend: the graphs and guards are dynamo's own, the same as under
inductor for static shapes, without inductor's C++ code generation (about 25 s per graph for the tiny BERT
on this CPU, against a 20 s budget for all of these tests).
"""

from __future__ import annotations

import pytest
import torch

import adarank.runner.shapes
from adarank.runner.data import Batches
from adarank.runner.shapes import warn_graph_shapes

from e2e import run, tiny_config
from runner.data.test_buckets import _split

#: 34 rows in batches of 4: 8 full batches and a short one of 2 per epoch, 12 steps: the epoch and 3 batches.
#: One layer and one adapted matrix type: dynamo traces a graph in about 1 s on this CPU (5 s for the whole model).
FAST = ["method=lora", "method.targets=[query]", "model.random_config.num_hidden_layers=1", "train.compile=true",
        "train.batch_size=4", "data.max_train_samples=34", "train.max_steps=12", "data.max_eval_samples=8",
        "train.eval_every=12"]


@pytest.fixture
def compiled_run(tmp_path, monkeypatch):
    """Run a compiled tiny training (dynamo's eager backend) with these overrides; (results, the train loader)."""
    monkeypatch.setattr(adarank.runner.shapes, "BACKEND", "eager")
    loaders = []
    real = adarank.runner.train.prepare_data
    monkeypatch.setattr(adarank.runner.train, "prepare_data", lambda *a: loaders.append(real(*a)) or loaders[-1])

    def go(*overrides: str):
        torch._dynamo.reset()  # graphs compiled by an earlier test for the same shapes would be reused
        res = run(tiny_config(tmp_path, *FAST, *overrides), tmp_path / str(len(loaders)))
        return res, loaders[-1].train

    return go


def _batches_of_run(train: Batches, steps: int) -> tuple[set[int], int]:
    """(the widths of the full batches, the number of short batches) among the first `steps` batches of a run
    (one optimizer step each)."""
    widths, short, seen, epoch = set(), 0, 0, 0
    while seen < steps:
        train.set_epoch(epoch)
        for b in train:
            if seen == steps:
                break
            seen += 1
            if b["input_ids"].shape[0] == train.batch_size:
                widths.add(b["input_ids"].shape[1])
            else:
                short += 1
        epoch += 1
    return widths, short


def test_a_compiled_run_compiles_one_graph_per_bucket_and_fewer_than_without_buckets(compiled_run):
    res, train = compiled_run("data.length_buckets=multiple:16")
    rec = res["compile"]
    widths, short = _batches_of_run(train, res["steps"])
    assert rec["buckets"] == [16, 32, 48, 64] and len(widths) >= 2  # several buckets in use
    assert rec["graphs"] == len(widths) <= len(rec["buckets"])  # one static graph per width, nothing else
    assert rec["recompiles"] == rec["graphs"] - 1 and rec["graph_breaks"] == 0
    assert rec["eager_batches"] == short == 1  # the short last batch of the epoch
    assert res["cuda_graph"] is None

    one, _ = compiled_run("data.length_buckets=[64]")
    dynamic, _ = compiled_run("data.length_buckets=none")
    assert one["compile"]["graphs"] == 1 and one["compile"]["recompiles"] == 0
    # without buckets: a static graph for the first width, then a dynamic one (automatic dynamic shapes)
    assert dynamic["compile"]["buckets"] is None and dynamic["compile"]["graphs"] > one["compile"]["graphs"]


def test_without_compile_nothing_is_recorded(tmp_path):
    res = run(tiny_config(tmp_path, "method=lora", "train.max_steps=1", "data.max_eval_samples=8"), tmp_path / "out")
    assert res["compile"] is None and res["cuda_graph"] is None


def test_more_batch_shapes_than_captured_graphs_are_reported_unless_buckets_bound_them():
    split, said = _split(48), []
    warn_graph_shapes(Batches(split, 4, shuffle=True), 3, said.append)
    assert len(said) == 1 and "data.length_buckets" in said[0]
    warn_graph_shapes(Batches(split, 4, shuffle=True, buckets=[8, 16]), 3, said.append)  # widths 8, 16, 22
    assert len(said) == 1
