"""Batches of pre-padded tensors: index rows, trim to the longest row in the batch (or up to its length
bucket, buckets.py), no collate function."""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from .buckets import padded_width
from .tokenize import EncodedSplit


class Batches:
    """An iterable of batches (dicts of CPU tensors) over an `EncodedSplit`.

    The order of an epoch is a pure function of (seed, epoch), so a run resumed with the same
    `set_epoch(epoch, start_batch)` sees exactly the batches it would have seen. With `world_size > 1`
    each rank takes every `world_size`-th index of that order, padded by repetition to equal length
    (as torch's DistributedSampler does), so all ranks run the same number of steps. With `buckets` (sorted
    widths, see buckets.py) a batch is padded up to the smallest bucket that holds its longest row.
    """

    def __init__(self, split: EncodedSplit, batch_size: int, shuffle: bool, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1, pin_memory: bool = False,
                 buckets: Sequence[int] | None = None) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.pin_memory = pin_memory
        if buckets is not None and (not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1):
            raise ValueError(f"buckets must be increasing positive widths, got {list(buckets)}")
        self.buckets = list(buckets) if buckets is not None else None
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch whose order the next iteration uses, starting at batch `start_batch` (to resume)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}], got {start_batch}")
        self.epoch = epoch
        self.start_batch = start_batch

    def num_rows(self) -> int:
        """Rows this rank sees per epoch (the dataset padded to a multiple of world_size, divided by it)."""
        return math.ceil(len(self.split) / self.world_size)

    def __len__(self) -> int:
        """Batches per full epoch on this rank (not counting `start_batch`)."""
        rows = self.num_rows()
        return rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size)

    def indices(self) -> torch.Tensor:
        """This rank's row order for the current epoch."""
        n = len(self.split)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        else:
            order = np.arange(n)
        total = self.num_rows() * self.world_size
        if total > n:  # repeat from the start so every rank gets the same number of rows
            order = np.resize(order, total)
        return torch.from_numpy(order[self.rank:total:self.world_size].copy())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.indices()
        for b in range(self.start_batch, len(self)):
            yield self.batch(order[b * self.batch_size:(b + 1) * self.batch_size])

    def batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows `idx` trimmed to their longest row (or its bucket), with the attention mask derived from the lengths."""
        s = self.split
        lengths = s.lengths[idx]
        width = padded_width(int(lengths.max()) if len(idx) else 0, self.buckets, s.input_ids.shape[1])
        out = {
            "input_ids": s.input_ids[idx, :width].long(),
            "attention_mask": (torch.arange(width) < lengths[:, None]).long(),
            "labels": s.labels[idx],
        }
        if s.token_type_ids is not None:
            out["token_type_ids"] = s.token_type_ids[idx, :width].long()
        if self.pin_memory:
            out = {k: v.pin_memory() for k, v in out.items()}
        return out
