"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Each writer goes to a temp file in the destination's directory (so ``os.replace`` is a
rename on one filesystem), is flushed and fsynced, then replaces the destination. On any
error the temp file is removed and the old destination is left untouched.

A process killed outright (SIGKILL, a power cut) runs no cleanup, so its temp file stays:
``temp_pattern`` / ``remove_stale_temps`` recognise exactly the names this module gives its
temp files (``.<name>.<random>.tmp`` next to ``<name>``), for the owner of ``<name>`` to
sweep them up when it knows no writer of its own is running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

PathLike = str | os.PathLike

# The temp file of a write to <dir>/<name> is <dir>/.<name>.<random>.tmp; <random> is tempfile.mkstemp's
# (letters, digits, underscores: never a dot, so the temps of "a.pt" and of "a.pt.json" never match each other).
_TEMP_PREFIX = ".{}."
_TEMP_SUFFIX = ".tmp"


def temp_pattern(path: PathLike) -> re.Pattern[str]:
    """The names of the temp files that atomic writes of ``path`` create (matched against a bare file name)."""
    name = Path(path).name
    return re.compile(re.escape(_TEMP_PREFIX.format(name)) + r"[A-Za-z0-9_]+" + re.escape(_TEMP_SUFFIX))


def remove_stale_temps(path: PathLike) -> list[Path]:
    """Delete the temp files that killed atomic writes of ``path`` left next to it; returns those removed.

    Only call this when no write of ``path`` can be in flight: a live writer's temp file looks the same.
    """
    path = Path(path)
    pattern = temp_pattern(path)
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    removed = []
    for name in sorted(names):
        if pattern.fullmatch(name):
            with contextlib.suppress(FileNotFoundError):  # another process may have swept it first
                os.unlink(path.parent / name)
                removed.append(path.parent / name)
    return removed


@contextlib.contextmanager
def atomic_writer(path: PathLike) -> Iterator[IO[bytes]]:
    """Yield a binary file handle whose contents replace ``path`` when the block exits cleanly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX.format(path.name), suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # BaseException too: a KeyboardInterrupt mid-checkpoint must not leave litter.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_link_or_copy(src: PathLike, dst: PathLike) -> None:
    """Atomically make ``dst`` hold what ``src`` holds, leaving ``src`` in place.

    A hard link where the filesystem has them (no bytes copied: ``src`` and ``dst`` then share one inode, which is
    safe because every writer here replaces a file by rename and never rewrites one in place); else a copy.
    """
    src, dst = Path(src), Path(dst)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=_TEMP_PREFIX.format(dst.name), suffix=_TEMP_SUFFIX)
    os.close(fd)
    try:
        os.unlink(tmp)  # mkstemp reserved a fresh name; os.link needs it free
        try:
            os.link(src, tmp)
        except OSError:  # no hard links on this filesystem (FAT, some network mounts): copy
            with atomic_writer(dst) as f, open(src, "rb") as source:
                shutil.copyfileobj(source, f)
            return
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(dst.parent)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable across a power cut; not possible on every OS.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Atomically replace ``path`` with ``text``."""
    atomic_write_bytes(path, text.encode(encoding))


def json_default(obj: Any) -> Any:
    """``json.dumps`` hook: numpy scalars and arrays become plain Python values."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (key order kept; numpy values allowed)."""
    # Serialise before touching the disk, so a bad object never creates a temp file.
    text = json.dumps(obj, indent=2, sort_keys=False, default=json_default)
    atomic_write_text(path, text + "\n")


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` that never leaves a truncated checkpoint behind."""
    import torch  # lazy: the reporting tools use this module without torch

    with atomic_writer(path) as f:
        torch.save(obj, f)
