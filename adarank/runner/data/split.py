"""Seeded splits of a training set: a held-out validation set for model selection, and subsampling."""

from __future__ import annotations

import numpy as np
from datasets import Dataset


def carve_validation(train: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split `train` into (train, val), `val` holding `fraction` of the rows, chosen by a seeded permutation.

    Model selection uses `val`, so the official dev set is only ever reported, never tuned on.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {fraction}")
    n = len(train)
    n_val = round(n * fraction)
    if not 0 < n_val < n:
        raise ValueError(f"data.val_fraction={fraction} leaves an empty train or val split of {n} rows")
    order = np.random.default_rng(seed).permutation(n)
    # Sorted indices keep the file order inside each split (and make `select` cheaper); the loader shuffles.
    return train.select(np.sort(order[n_val:])), train.select(np.sort(order[:n_val]))


def subsample(ds: Dataset, max_samples: int | None, seed: int) -> Dataset:
    """Keep a seeded random `max_samples` rows of `ds` (all of them when None or larger than `ds`)."""
    if max_samples is None or max_samples >= len(ds):
        return ds
    if max_samples <= 0:
        raise ValueError(f"data.max_train_samples must be positive, got {max_samples}")
    return ds.select(np.sort(np.random.default_rng(seed).permutation(len(ds))[:max_samples]))
