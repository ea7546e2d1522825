"""Sequence-length buckets (`data.length_buckets`): pad each training batch up to one of a few widths.

With dynamic padding every batch is as wide as its longest row, so a run sees dozens of batch shapes. A
compiled model (`train.compile`) and a CUDA graph (`train.cuda_graph`) are specialised to a shape: with
buckets a run sees at most `len(buckets)` widths, so it compiles or captures at most that many times.

Padding up to a bucket changes no loss: the extra positions have attention mask 0, the tokenizer's pad id
(token type 0) and, for per-token labels, -100; they were already stored that way (`EncodedSplit` is padded to
its longest row), and a batch is never padded past the split's stored width, its longest row. So the widths
a run sees are the buckets below that row's length, and that length itself: still at most `len(buckets)`.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["FORMS", "MIN_POW2", "check_spec", "padded_width", "resolve_buckets", "shapes_of_epoch"]

FORMS = "none, pow2, multiple:N or a list of lengths such as [32, 64]"
MIN_POW2 = 8  # pow2 starts here: narrower buckets would save next to nothing (task.max_length is at least 8)
FIELD = "data.length_buckets"


def _fail(msg: str) -> None:
    raise ValueError(f"{FIELD}: {msg}")


def check_spec(spec: Any) -> None:
    """Raise a ValueError naming data.length_buckets unless `spec` has one of the accepted FORMS."""
    if isinstance(spec, str):
        if spec in ("none", "pow2"):
            return
        step = spec.removeprefix("multiple:")
        if step != spec and step.isdigit() and int(step) >= 1:
            return
        _fail(f"must be {FORMS}, got {spec!r}")
    if not isinstance(spec, (list, tuple)):
        _fail(f"must be {FORMS}, got {spec!r}" + (" (a single length is a list: [N])" if isinstance(spec, int) else ""))
    if not spec:
        _fail("the list is empty; use none for dynamic padding")
    bad = [v for v in spec if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        _fail(f"lengths must be integers >= 1, got {bad[0]!r}")


def resolve_buckets(spec: Any, max_length: int) -> list[int] | None:
    """The sorted widths `spec` stands for, the largest being `max_length` (task.max_length); None for none.

    pow2: 8, 16, 32, ... below max_length, then max_length. multiple:N: N, 2N, ... below max_length, then
    max_length. A list: its lengths, none above max_length, with max_length added when absent (so every row
    has a bucket). Raises a ValueError naming data.length_buckets for anything else.
    """
    check_spec(spec)
    if spec == "none":
        return None
    if spec == "pow2":
        below = [1 << k for k in range(MIN_POW2.bit_length() - 1, max_length.bit_length()) if 1 << k < max_length]
    elif isinstance(spec, str):
        step = int(spec.removeprefix("multiple:"))
        below = list(range(step, max_length, step))
    else:
        over = [v for v in spec if v > max_length]
        if over:
            _fail(f"{over[0]} exceeds task.max_length={max_length}: no batch is ever wider")
        below = [v for v in spec if v < max_length]
    return sorted(set(below)) + [max_length]


def padded_width(longest: int, buckets: Sequence[int] | None, stored: int) -> int:
    """The width of a batch whose longest row has `longest` tokens: the smallest bucket that holds it, but
    never past `stored` (the split's width, where the stored padding ends); `longest` without buckets."""
    if buckets is None or longest == 0:
        return longest
    i = int(np.searchsorted(np.asarray(buckets), longest))  # first bucket >= longest
    return min(buckets[i] if i < len(buckets) else stored, stored)


def shapes_of_epoch(lengths: np.ndarray, order: np.ndarray, batch_size: int, buckets: Sequence[int] | None,
                    stored: int) -> set[tuple[int, int]]:
    """The distinct (rows, width) batch shapes of an epoch that visits rows in `order` (the last batch may
    have fewer rows); for the check of train.cuda_graph_shapes."""
    if len(order) == 0:
        return set()
    starts = np.arange(0, len(order), batch_size)
    longest = np.maximum.reduceat(lengths[order], starts)
    rows = np.diff(np.append(starts, len(order)))
    return {(int(r), padded_width(int(v), buckets, stored)) for r, v in zip(rows, longest)}
