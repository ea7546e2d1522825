"""Tokenise a split once into padded tensors, and cache the result on disk."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from datasets import Dataset

CACHE_VERSION = 1  # bump when the encoding or the file format changes, to invalidate old caches
CHUNK_ROWS = 16384  # rows per tokenizer call: big enough for the fast tokenizer's threads, small enough for memory


@dataclass
class EncodedSplit:
    """A tokenised split as right-padded tensors; the attention mask is `arange(L) < lengths`."""

    input_ids: torch.Tensor
    """(N, L_max) int32, padded with the tokenizer's pad id; L_max is the longest row, at most max_length."""
    lengths: torch.Tensor
    """(N,) int32 number of real tokens in each row."""
    labels: torch.Tensor
    """(N,) int64 class ids, or float32 scores for regression."""
    token_type_ids: torch.Tensor | None = None
    """(N, L_max) int32 segment ids (padded with 0), when the tokenizer produces them."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def encode(
    ds: Dataset,
    tokenizer: Any,
    text_fields: Sequence[str],
    max_length: int,
    cache_dir: str | None,
) -> EncodedSplit:
    """Tokenise `ds[text_fields]` (a pair when there are two fields), truncated to `max_length`.

    With `cache_dir`, the tensors are saved there under a hash of the tokenizer, `max_length`, the
    fields and the data, and a later call with the same inputs loads them instead of tokenising.
    """
    if len(text_fields) not in (1, 2):
        raise ValueError(f"encode: needs one or two text fields, got {list(text_fields)}")
    # `[:]` materialises a whole column at once (a lazy Column in datasets>=4, iterated row by row otherwise).
    columns = [ds[f][:] for f in text_fields]
    labels = np.asarray(ds["label"][:])
    path = None
    if cache_dir is not None:
        key = cache_key(tokenizer, max_length, text_fields, columns, labels)
        path = Path(cache_dir) / f"encoded-{key}.pt"
        if path.is_file():
            return EncodedSplit(**torch.load(path, weights_only=True))
    split = _tokenize(tokenizer, columns, labels, max_length)
    if path is not None:
        _save_atomic(split.to_dict(), path)
    return split


def _tokenize(tokenizer: Any, columns: list[list[str]], labels: np.ndarray, max_length: int) -> EncodedSplit:
    # Each chunk's Python lists become flat int32 arrays at once, so memory stays near the final tensor size.
    lengths, ids, types = [], [], []
    for lo in range(0, len(columns[0]), CHUNK_ROWS):
        chunk = [c[lo:lo + CHUNK_ROWS] for c in columns]
        enc = tokenizer(*chunk, truncation=True, max_length=max_length, padding=False, return_attention_mask=False)
        lengths.append(np.fromiter(map(len, enc["input_ids"]), dtype=np.int32, count=len(enc["input_ids"])))
        ids.append(_flatten(enc["input_ids"], int(lengths[-1].sum())))
        if "token_type_ids" in enc:
            types.append(_flatten(enc["token_type_ids"], int(lengths[-1].sum())))
    n = _concat(lengths)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    label_dtype = torch.float32 if labels.dtype.kind == "f" else torch.int64
    return EncodedSplit(
        input_ids=_pad(_concat(ids), n, pad_id),
        lengths=torch.from_numpy(n),
        labels=torch.as_tensor(labels, dtype=label_dtype),
        token_type_ids=_pad(_concat(types), n, 0) if types else None,
    )


def _flatten(rows: list[list[int]], total: int) -> np.ndarray:
    return np.fromiter((t for row in rows for t in row), dtype=np.int32, count=total)


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)


def _pad(flat: np.ndarray, lengths: np.ndarray, pad: int) -> torch.Tensor:
    """Right-pad the rows stored back to back in `flat` into an (N, longest row) int32 tensor."""
    width = int(lengths.max(initial=0))
    out = np.full((len(lengths), width), pad, dtype=np.int32)
    out[np.arange(width) < lengths[:, None]] = flat  # row-major order of the mask = row after row
    return torch.from_numpy(out)


def cache_key(tokenizer: Any, max_length: int, text_fields: Sequence[str],
              columns: list[list[str]], labels: np.ndarray) -> str:
    """A hash of everything the encoding depends on: tokenizer, max_length, fields and the data itself."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    meta = {
        "version": CACHE_VERSION,
        "tokenizer": [getattr(tokenizer, "name_or_path", ""), len(tokenizer)],
        "max_length": max_length,
        "text_fields": list(text_fields),
    }
    h.update(json.dumps(meta, sort_keys=True).encode())
    # The fast tokenizer's full definition, so two different tokenizers saved under the same path differ.
    # Its truncation/padding state changes with every call (and is set from max_length anyway): drop it.
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
        h.update(json.dumps(definition, sort_keys=True).encode())
    # Hash the content rather than the dataset fingerprint, which is random for some in-memory datasets.
    for column in columns:
        h.update(len(column).to_bytes(8, "little"))
        h.update("\x00".join(column).encode("utf-8", errors="surrogatepass"))
    h.update(str(labels.dtype).encode())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:24]


def _save_atomic(obj: dict[str, torch.Tensor], path: Path) -> None:
    """torch.save to a temp file, then rename: readers (other ranks, later runs) never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
