"""Data: task registry, GLUE and tweets loading, held-out validation, tokenisation, batching, metrics."""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset

from .glue import load_glue
from .loader import Batches
from .metrics import compute_metrics
from .split import carve_validation, subsample
from .tasks import TASKS, TaskSpec, TsvLayout, get_task
from .tokenize import EncodedSplit, encode
from .tweets import load_tweets

__all__ = [
    "TASKS", "Batches", "EncodedSplit", "TaskData", "TaskSpec", "TsvLayout", "carve_validation",
    "compute_metrics", "encode", "get_task", "load_glue", "load_task", "load_tweets", "subsample",
]

TWEETS_SPLIT_SEED = 0


@dataclass
class TaskData:
    """A task's raw splits: `train` and `val` (carved from the official train), plus the official dev splits."""

    task: TaskSpec
    splits: dict[str, Dataset]


def load_task(task_name: str, data_dir: str | None, seed: int, val_fraction: float,
              max_train_samples: int | None = None) -> TaskData:
    """Load a task and carve a seeded `val` split from its train split for model selection.

    `max_train_samples` subsamples the remaining train rows (after carving, so `val` does not depend on it).
    """
    task = get_task(task_name)
    if task.source == "tweets":
        # The official tweets split stays fixed across runs so that results with different seeds compare.
        official = load_tweets(seed=TWEETS_SPLIT_SEED)
    elif task.source == "bbc":
        from .bbc import load_bbc

        official = load_bbc(seed=TWEETS_SPLIT_SEED)  # fixed by article, like the tweets split
    else:
        official = load_glue(task, data_dir)
    train, val = carve_validation(official["train"], val_fraction, seed)
    train = subsample(train, max_train_samples, seed)
    splits = {"train": train, "val": val, **{name: official[name] for name in task.dev_splits}}
    return TaskData(task=task, splits=splits)
