import json

import numpy as np
import pytest
import torch

from adarank.atomic import (
    atomic_link_or_copy,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
    remove_stale_temps,
    temp_pattern,
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


def test_temp_pattern_matches_the_writers_own_temp_file_and_no_other(tmp_path):
    path = tmp_path / "ckpt.pt"
    with atomic_writer(path) as f:
        f.write(b"x")
        (live,) = [p.name for p in tmp_path.iterdir()]  # the temp file, mid-write
    assert temp_pattern(path).fullmatch(live)
    for other in ("ckpt.pt", ".ckpt.pt.json.abcd1234.tmp", ".xckpt.pt.abcd1234.tmp", ".ckpt.pt.abcd1234.tmp.bak",
                  "ckpt.pt.abcd1234.tmp", ".ckpt.pt..tmp"):
        assert not temp_pattern(path).fullmatch(other), other


def test_remove_stale_temps_removes_only_the_temps_of_that_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_write_bytes(path, b"good")
    stale = [".ckpt.pt.abcd1234.tmp", ".ckpt.pt.z_9y8x7w.tmp"]  # what a SIGKILL mid-write leaves (often 0 bytes)
    others = [".ckpt.pt.json.abcd1234.tmp", ".other.pt.abcd1234.tmp"]
    for name in stale + others:
        (tmp_path / name).write_bytes(b"")
    assert remove_stale_temps(path) == [tmp_path / n for n in sorted(stale)]
    assert _only(tmp_path) == sorted(["ckpt.pt", *others])
    assert path.read_bytes() == b"good"
    assert remove_stale_temps(tmp_path / "missing-dir" / "f") == []


@pytest.mark.parametrize("links", [True, False])
def test_link_or_copy_keeps_the_source_and_replaces_the_destination(tmp_path, monkeypatch, links):
    if not links:
        def no_links(src, dst):
            raise OSError("hard links not supported")
        monkeypatch.setattr("os.link", no_links)
    src, dst = tmp_path / "a.pt", tmp_path / "b.pt"
    atomic_write_bytes(src, b"new")
    atomic_write_bytes(dst, b"old")
    atomic_link_or_copy(src, dst)
    assert src.read_bytes() == dst.read_bytes() == b"new"
    assert src.samefile(dst) == links
    atomic_write_bytes(src, b"newer")  # a writer replaces by rename: the other name keeps its bytes
    assert dst.read_bytes() == b"new"
    assert _only(tmp_path) == ["a.pt", "b.pt"]
    with pytest.raises(FileNotFoundError):
        atomic_link_or_copy(tmp_path / "missing", dst)
    assert dst.read_bytes() == b"new" and _only(tmp_path) == ["a.pt", "b.pt"]
