import json

import numpy as np
import pytest
import torch

from adarank.atomic import (
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
)


def _only(tmp_path):
    """Every file in tmp_path: proves no temp file was left behind."""
    return sorted(p.name for p in tmp_path.iterdir())


def test_writes_bytes_text_json(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "sub" / "b.txt", "héllo")  # creates the parent folder
    obj = {"z": np.float32(0.5), "a": np.int64(3), "arr": np.arange(3), "b": [1, None]}
    atomic_write_json(tmp_path / "c.json", obj)

    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == "héllo"
    text = (tmp_path / "c.json").read_text()
    assert json.loads(text) == {"z": 0.5, "a": 3, "arr": [0, 1, 2], "b": [1, None]}
    assert list(json.loads(text)) == ["z", "a", "arr", "b"]  # key order kept
    assert '\n  "z"' in text  # indent 2
    assert _only(tmp_path) == ["a.bin", "c.json", "sub"]


def test_replaces_existing_file(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert _only(tmp_path) == ["f.txt"]


def test_unserialisable_json_keeps_old_file(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert _only(tmp_path) == ["r.json"]


def test_failure_mid_write_keeps_old_file_and_removes_temp(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError), atomic_writer(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("crash")
    assert path.read_bytes() == b"old"
    assert _only(tmp_path) == ["f.bin"]


def test_torch_save_roundtrip_and_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save({"w": torch.ones(2), "step": 7}, path)
    loaded = torch.load(path)
    assert loaded["step"] == 7 and torch.equal(loaded["w"], torch.ones(2))

    # A lambda cannot be pickled: torch.save fails after it has started writing.
    with pytest.raises(Exception):
        atomic_torch_save({"w": torch.zeros(1000), "f": lambda: 0}, path)
    assert torch.load(path)["step"] == 7
    assert _only(tmp_path) == ["ckpt.pt"]
