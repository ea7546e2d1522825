"""Checkpoints: one dict, written atomically, holding everything a resumed run needs; the previous one kept.

The ring, in the run's output directory:

* ``checkpoint.pt``: the newest checkpoint, a plain ``torch.save`` file (``torch.load`` reads it directly);
* ``checkpoint.pt.json``: its sidecar, ``{"format", "size", "sha256", "step"}``, written after the checkpoint
  (``load`` checks size and sha256; the step is for whoever looks at the directory);
* ``checkpoint.prev.pt`` and ``checkpoint.prev.pt.json``: the checkpoint before it, and its sidecar.

Why a sidecar rather than a check embedded in the checkpoint: ``checkpoint.pt`` stays exactly what ``torch.save``
writes, so older adarank versions, ``torch.load`` and other tools read it unchanged, and a checkpoint of an older
version is simply one without a sidecar (loaded unverified). The check runs on the bytes before they are
unpickled, so a truncated or bit-flipped file is rejected before ``torch.load`` sees it; a checksum inside the
pickle (a wrapper dict) could only be read by unpickling first, and a header in front of the zip would make the file
unreadable to ``torch.load``. The pair is not written in one step, but the order makes that safe: a kill between
the checkpoint and its sidecar leaves a checkpoint whose sidecar describes another file, which fails verification
and falls back to the previous checkpoint (at a run's first checkpoint there is no sidecar yet: the file loads
unverified, and it is complete, having been renamed into place whole); a sidecar never vouches for bytes that
were not fully written.

Why the previous checkpoint is kept by hard link (``atomic_link_or_copy``) rather than renamed away: the newest
name never disappears, even for an instant, so a missing ``checkpoint.pt`` always means "nothing to resume" (the
callers treat it so: ``cli.check_out_dir`` checks it, ``results.py`` deletes it when a run finishes).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from collections.abc import Callable
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from ..atomic import (
    atomic_link_or_copy,
    atomic_write_json,
    atomic_writer,
    remove_stale_temps,
)

__all__ = [
    "CKPT_NAME", "PREV_NAME", "SIDECAR_SUFFIX", "CheckpointError", "trainable_state", "load_trainable_state",
    "rng_state", "set_rng_state", "save", "load", "remove", "paths",
]

CKPT_NAME = "checkpoint.pt"
PREV_NAME = "checkpoint.prev.pt"
SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = 1


class CheckpointError(ValueError):
    """No checkpoint in the output directory can be used; the one-line message names the files and why."""


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (adapters, heads; everything for full fine-tuning)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"checkpoint: parameters not in the model: {missing[:3]}")
    for n, v in state.items():
        if params[n].shape != v.shape:
            raise ValueError(f"checkpoint: shape of {n} is {tuple(v.shape)}, model has {tuple(params[n].shape)}")
        params[n].copy_(v)


def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def paths(out_dir: str) -> tuple[str, str]:
    """The ring's checkpoint files, newest first: ``(checkpoint.pt, checkpoint.prev.pt)`` (each has a sidecar)."""
    return os.path.join(out_dir, CKPT_NAME), os.path.join(out_dir, PREV_NAME)


def _sidecar(path: str) -> str:
    return path + SIDECAR_SUFFIX


def _ring_files(out_dir: str) -> list[str]:
    """Every file the ring may hold: the checkpoints and their sidecars."""
    return [f for p in paths(out_dir) for f in (p, _sidecar(p))]


def _remove_stale_temps(out_dir: str) -> None:
    """Delete the temp files of checkpoint writes that a kill interrupted (atomic.py's names for our files only).

    Safe in ``save`` and ``load``: a run writes its checkpoints from one process (rank 0), and only between
    optimizer steps, so no write of ours is in flight when either runs.
    """
    for f in _ring_files(out_dir):
        remove_stale_temps(f)


# Files this process wrote or verified, by path, with the stat that identifies that exact file: lets `save` rotate
# the checkpoint it wrote itself without reading and hashing it again.
_known_good: dict[str, tuple[int, int, int, int]] = {}


def _identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _remember_good(path: str) -> None:
    _known_good[os.path.abspath(path)] = _identity(path)


class _HashingWriter:
    """A write-only file wrapper that hashes and counts the bytes on their way to disk (one pass, no re-read)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        return self.f.write(view)

    def flush(self) -> None:
        self.f.flush()


def save(out_dir: str, state: dict[str, Any]) -> str:
    """Write ``state`` as the newest checkpoint, keeping the one it replaces as the previous; returns its path.

    Order, each step atomic, so a kill anywhere leaves at least one verifiable checkpoint: rotate the newest to
    the previous (only if it verifies, so the previous is always a good one: after a resume that fell back, the
    rejected newest is overwritten, not kept), write the new checkpoint, then its sidecar.
    """
    newest, previous = paths(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    _remove_stale_temps(out_dir)
    if os.path.exists(newest):
        if _rejection(newest, deep=False) is None:
            _rotate(newest, previous)
    else:  # a fresh ring: a previous checkpoint left by an earlier run in this directory is not this run's
        for f in (previous, _sidecar(previous)):
            _remove_if_present(f)
    with atomic_writer(newest) as f:
        hashed = _HashingWriter(f)
        torch.save(state, hashed)
    step = state.get("step")
    sidecar = {"format": SIDECAR_FORMAT, "size": hashed.size, "sha256": hashed.sha256.hexdigest(),
               "step": step if isinstance(step, int) else None}  # for a reader of the directory
    atomic_write_json(_sidecar(newest), sidecar)
    _remember_good(newest)
    return newest


def _rotate(newest: str, previous: str) -> None:
    """Make the previous checkpoint a copy of the newest (hard links; the newest stays in place).

    The previous sidecar goes first, so a kill midway leaves a previous checkpoint with no sidecar (unverified,
    still complete) rather than one with another file's sidecar.
    """
    _remove_if_present(_sidecar(previous))
    atomic_link_or_copy(newest, previous)
    if os.path.exists(_sidecar(newest)):
        atomic_link_or_copy(_sidecar(newest), _sidecar(previous))


def _remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def remove(out_dir: str) -> list[str]:
    """Delete every checkpoint file of ``out_dir`` (both checkpoints, their sidecars, stale temps); the run is done.

    Returns the files removed (temps not counted).
    """
    _remove_stale_temps(out_dir)
    removed = []
    for f in _ring_files(out_dir):
        _known_good.pop(os.path.abspath(f), None)
        if os.path.exists(f):
            _remove_if_present(f)
            removed.append(f)
    return removed


def _warn_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load(out_dir: str, warn: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The newest usable checkpoint of ``out_dir``, or None when there is none to resume (no ``checkpoint.pt``).

    The newest is verified against its sidecar (size, sha256) and must unpickle; if it fails, the previous
    one is tried, and ``warn`` (default: print to stderr) gets one line naming both files and why the newest was
    rejected. Raises ``CheckpointError`` (one line, naming the files) when neither is usable. A checkpoint without
    a sidecar (written by an older version, or killed before its sidecar) is used if ``torch.load`` reads it.
    """
    newest, previous = paths(out_dir)
    _remove_stale_temps(out_dir)
    if not os.path.exists(newest):
        return None  # the previous checkpoint alone is a finished run's leftover, not something to resume
    state, why = _verified_load(newest)
    if why is None:
        return state
    if not os.path.exists(previous):
        raise CheckpointError(f"checkpoint {newest} is unusable ({why}) and there is no previous checkpoint "
                              f"({previous}) to fall back to")
    state, why_previous = _verified_load(previous)
    if why_previous is not None:
        raise CheckpointError(f"no usable checkpoint in {out_dir}: {newest} is unusable ({why}), and so is the "
                              f"previous one, {previous} ({why_previous})")
    (warn or _warn_stderr)(f"adarank: warning: checkpoint {newest} is unusable ({why}); resuming from the previous "
                           f"one, {previous} (step {state.get('step')})")
    return state


def _verified_load(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """``(state, None)`` if ``path`` verifies and unpickles to a checkpoint dict, else ``(None, why not)``."""
    try:
        why = _rejection(path, deep=True)
    except OSError as e:  # unreadable: permissions, a directory in its place, an I/O error
        why = _one_line(f"{type(e).__name__}: {e}")
    if why is not None:
        return None, why
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a damaged file fails in unpickling, zip reading, storage decoding...
        return None, f"torch.load failed: {_one_line(f'{type(e).__name__}: {e}')}"
    if not isinstance(state, dict):
        return None, f"holds a {type(state).__name__}, not a checkpoint dict"
    _remember_good(path)
    return state, None


def _rejection(path: str, deep: bool) -> str | None:
    """Why ``path`` fails its sidecar's check, or None if it passes (or has no sidecar and ``deep``).

    ``deep=True`` is ``load``'s check, always against the bytes on disk. ``deep=False`` is ``save``'s question
    before rotating ("is this a good checkpoint to keep?"): a file this process wrote or loaded passes without
    being read again, and one with no sidecar that this process did not load fails (its origin is unknown).
    """
    size = os.path.getsize(path)
    if size == 0:
        return "it is empty (0 bytes)"
    if not deep and _known_good.get(os.path.abspath(path)) == _identity(path):
        return None  # not for load: an in-place change within one timestamp tick would keep the identity
    try:
        sidecar = _read_sidecar(path)
    except ValueError as e:
        return str(e)
    if sidecar is None:
        return None if deep else "no sidecar and not loaded by this process"
    if size != sidecar.get("size"):
        return f"{size} bytes, its sidecar {_sidecar(path)} says {sidecar.get('size')}"
    if _sha256(path) != sidecar.get("sha256"):
        return f"sha256 differs from its sidecar {_sidecar(path)}"
    return None


def _read_sidecar(path: str) -> dict[str, Any] | None:
    """The sidecar of ``path``; None if there is none; ValueError (one line) if it is unreadable."""
    side = _sidecar(path)
    try:
        with open(side, encoding="utf-8") as f:
            sidecar = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ValueError(f"its sidecar {side} is unreadable ({_one_line(str(e))})") from e
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"its sidecar {side} is not a format-{SIDECAR_FORMAT} checkpoint sidecar")
    return sidecar


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _one_line(text: str, limit: int = 200) -> str:
    """Exceptions from torch.load span lines and run long; a warning or error must stay one readable line."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
