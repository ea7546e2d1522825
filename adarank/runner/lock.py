"""One owner per output dir: a run holds an exclusive lock file there for its whole lifetime.

Two runs started into one folder would otherwise overwrite each other's checkpoints and results and both
exit 0. The lock is a file created with O_EXCL (atomic on every local file system) holding the owner's pid,
host and start time; it is removed when the run ends, however it ends. A lock whose owner is a process of
this host that no longer exists (a kill -9, a power cut) is stale: the next run takes it over and says so.
A lock held from another host is never taken over, since this host cannot see whether its owner lives.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Callable

__all__ = ["LOCK_NAME", "OutDirBusy", "OutDirLock"]

LOCK_NAME = ".adarank.lock"


class OutDirBusy(FileExistsError):
    """Another run owns the output dir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class OutDirLock:
    """`with OutDirLock(out_dir): ...` owns `out_dir` for the block. Raises OutDirBusy (one line, naming the
    dir and the owner) when a live run owns it."""

    def __init__(self, out_dir: str, warn: Callable[[str], None] | None = None) -> None:
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, LOCK_NAME)
        self.warn = warn or (lambda msg: None)
        self.owned = False

    def __enter__(self) -> "OutDirLock":
        os.makedirs(self.out_dir, exist_ok=True)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(2):  # a second try after clearing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._clear_stale():
                    continue
                raise OutDirBusy(self._busy_message()) from None
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            self.owned = True
            return self
        raise OutDirBusy(self._busy_message())

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Remove the lock if this object took it (idempotent)."""
        if self.owned:
            self.owned = False
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def _owner(self) -> dict | None:
        try:
            with open(self.path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None  # being written right now, or unreadable

    def _clear_stale(self) -> bool:
        """Remove the lock if its owner is a dead process of this host; True when removed."""
        owner = self._owner()
        if owner is None or owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
            return False
        if _alive(owner["pid"]):
            return False
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        self.warn(f"{self.out_dir}: took over the lock of pid {owner['pid']} on {owner['host']}, which no longer runs")
        return True

    def _busy_message(self) -> str:
        owner = self._owner() or {}
        who = f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} since {owner.get('started', '?')}"
        return (f"{self.out_dir} is in use by another run ({who}; lock file {self.path}); wait for it to finish, "
                f"or use another output dir (hydra.run.dir=...)")
