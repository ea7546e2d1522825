"""Which code and which packages ran: recorded in every results.json."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path

__all__ = ["PACKAGE_ROOT", "TRAINING_CODE_EXCLUDES", "code_sha256", "git_sha", "versions"]

#: the adarank package folder whose source `code_sha256` hashes
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
#: what does not train, so does not count for `code_sha256`: the studies and their two command-line shims
TRAINING_CODE_EXCLUDES = ("studies/", "report.py", "analyze.py")


def versions() -> dict[str, str]:
    """Versions of Python and of the packages that decide a run's numbers."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "datasets", "peft", "hydra-core", "wandb", "numpy", "scipy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_sha() -> str | None:
    """The commit of the checkout the package runs from, if it is one."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5).stdout.strip() or None
    except Exception:
        return None


def code_sha256() -> str:
    """sha256 of the source that trains (every adarank/**/*.py but the studies, path and bytes, in path
    order): which code ran, also from an uncommitted tree or a copy without its .git, where `git_sha` says
    less or nothing. Editing a report or a study does not change it."""
    root = PACKAGE_ROOT
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if rel.startswith(TRAINING_CODE_EXCLUDES):
            continue
        h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()
