"""adarank.runner.checkpoint: the trainable state and the RNG states survive a save and a load."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from adarank.atomic import atomic_torch_save
from adarank.runner import checkpoint as ckpt

from conftest import svd_bert


def _draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), torch.randint(0, 100, (2,)).tolist()


def test_trainable_state_round_trip(tmp_path):
    model, _ = svd_bert()
    state = ckpt.trainable_state(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(state) == trainable and all(n.endswith((".P", ".lam", ".Q")) or "classifier" in n for n in state)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    assert not torch.equal(state["classifier.weight"], model.classifier.weight)  # a copy, not a view

    assert ckpt.load(str(tmp_path)) is None
    path = ckpt.save(str(tmp_path), {"model": state, "step": 7})
    assert path == str(tmp_path / ckpt.CKPT_NAME) and not list(tmp_path.glob(".*.tmp"))
    loaded = ckpt.load(str(tmp_path))
    assert loaded["step"] == 7

    other, _ = svd_bert(seed=1)
    ckpt.load_trainable_state(other, loaded["model"])
    assert all(torch.equal(p, state[n]) for n, p in other.named_parameters() if n in state)
    frozen = {n for n, p in other.named_parameters() if not p.requires_grad}
    base, _ = svd_bert(seed=1)
    assert all(torch.equal(p, dict(base.named_parameters())[n]) for n, p in other.named_parameters() if n in frozen)


def test_loading_a_mismatched_state_names_the_parameter():
    model, _ = svd_bert()
    state = ckpt.trainable_state(model)
    with pytest.raises(ValueError, match="checkpoint: parameters not in the model: \\['nope.weight'\\]"):
        ckpt.load_trainable_state(model, {"nope.weight": torch.zeros(1)})
    name = next(n for n in state if n.endswith(".lam"))
    with pytest.raises(ValueError, match=f"checkpoint: shape of {name} is \\(2,\\), model has \\(4,\\)"):
        ckpt.load_trainable_state(model, {name: torch.zeros(2)})


def test_rng_states_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ckpt.save(str(tmp_path), {"rng": ckpt.rng_state()})
    expected = _draws()
    _draws()  # move every generator on
    ckpt.set_rng_state(ckpt.load(str(tmp_path))["rng"])
    assert _draws() == expected


# ---- the ring: the previous checkpoint kept, each verified against its sidecar, a fallback when the newest is bad ----


def _save_steps(out, *steps: int) -> None:
    for step in steps:
        ckpt.save(str(out), {"step": step, "w": torch.full((256,), float(step))})


def _files(out) -> list[str]:
    return sorted(p.name for p in out.iterdir())


RING = ["checkpoint.prev.pt", "checkpoint.prev.pt.json", "checkpoint.pt", "checkpoint.pt.json"]


def test_the_ring_keeps_exactly_the_newest_and_the_previous_checkpoint(tmp_path):
    _save_steps(tmp_path, 1)
    assert _files(tmp_path) == ["checkpoint.pt", "checkpoint.pt.json"]
    _save_steps(tmp_path, 2, 3)
    assert _files(tmp_path) == RING
    newest, previous = ckpt.paths(str(tmp_path))
    assert newest == str(tmp_path / ckpt.CKPT_NAME) and previous == str(tmp_path / "checkpoint.prev.pt")
    assert torch.load(newest)["step"] == 3 and torch.load(previous)["step"] == 2
    for path, step in ((newest, 3), (previous, 2)):
        side = json.loads(Path(path + ".json").read_text())
        data = Path(path).read_bytes()
        assert side == {"format": 1, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "step": step}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _empty(path):
    path.write_bytes(b"")


def _flip_one_byte(path):
    """Same size, one bit pattern changed inside the tensor data: torch.load alone reads it without complaint."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,why", [
    (_truncate, "bytes, its sidecar"),
    (_random_bytes, "sha256 differs from its sidecar"),
    (_empty, "it is empty (0 bytes)"),
    (_flip_one_byte, "sha256 differs from its sidecar"),
])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_with_one_warning(tmp_path, damage, why):
    _save_steps(tmp_path, 1, 2)
    damage(tmp_path / ckpt.CKPT_NAME)
    warnings: list[str] = []
    state = ckpt.load(str(tmp_path), warn=warnings.append)
    assert state["step"] == 1 and torch.equal(state["w"], torch.full((256,), 1.0))
    (line,) = warnings
    assert "\n" not in line and why in line
    assert str(tmp_path / ckpt.CKPT_NAME) in line and str(tmp_path / "checkpoint.prev.pt") in line


def test_the_default_warning_is_one_line_on_stderr(tmp_path, capsys):
    _save_steps(tmp_path, 1, 2)
    _truncate(tmp_path / ckpt.CKPT_NAME)
    assert ckpt.load(str(tmp_path))["step"] == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("adarank: warning: checkpoint ") and "checkpoint.prev.pt" in err


def test_no_usable_checkpoint_is_a_one_line_error_naming_the_files(tmp_path):
    _save_steps(tmp_path, 1, 2)
    _truncate(tmp_path / ckpt.CKPT_NAME)
    _random_bytes(tmp_path / "checkpoint.prev.pt")
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.load(str(tmp_path), warn=pytest.fail)
    msg = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in msg
    assert str(tmp_path / ckpt.CKPT_NAME) in msg and str(tmp_path / "checkpoint.prev.pt") in msg

    alone = tmp_path / "alone"
    _save_steps(alone, 1)
    _empty(alone / ckpt.CKPT_NAME)
    with pytest.raises(ckpt.CheckpointError, match="no previous checkpoint") as info:
        ckpt.load(str(alone))
    assert str(alone / ckpt.CKPT_NAME) in str(info.value) and "\n" not in str(info.value)


def test_an_old_checkpoint_without_a_sidecar_still_loads_and_rotates(tmp_path):
    atomic_torch_save({"step": 4, "w": torch.ones(3)}, tmp_path / ckpt.CKPT_NAME)  # what older versions wrote
    assert ckpt.load(str(tmp_path), warn=pytest.fail)["step"] == 4
    _save_steps(tmp_path, 5)  # the resumed run's next checkpoint: the old one becomes the previous
    assert _files(tmp_path) == ["checkpoint.prev.pt", "checkpoint.pt", "checkpoint.pt.json"]
    _truncate(tmp_path / ckpt.CKPT_NAME)
    assert ckpt.load(str(tmp_path), warn=lambda m: None)["step"] == 4

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ckpt.CKPT_NAME).write_bytes(b"not a checkpoint")  # no sidecar, no previous: torch.load decides
    with pytest.raises(ckpt.CheckpointError, match="torch.load failed") as info:
        ckpt.load(str(broken))
    assert str(broken / ckpt.CKPT_NAME) in str(info.value) and "\n" not in str(info.value)


def test_a_kill_between_the_checkpoint_and_its_sidecar_falls_back(tmp_path, monkeypatch):
    _save_steps(tmp_path, 1, 2)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for the kill: the new checkpoint is in place, its sidecar is not

    monkeypatch.setattr(ckpt, "atomic_write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        _save_steps(tmp_path, 3)
    monkeypatch.undo()
    assert torch.load(tmp_path / ckpt.CKPT_NAME)["step"] == 3
    warnings: list[str] = []
    assert ckpt.load(str(tmp_path), warn=warnings.append)["step"] == 2 and len(warnings) == 1


def test_after_a_fallback_the_rejected_checkpoint_does_not_become_the_previous(tmp_path):
    _save_steps(tmp_path, 1, 2)
    _flip_one_byte(tmp_path / ckpt.CKPT_NAME)
    assert ckpt.load(str(tmp_path), warn=lambda m: None)["step"] == 1
    _save_steps(tmp_path, 2)  # the resumed run redoes step 2
    assert torch.load(tmp_path / "checkpoint.prev.pt")["step"] == 1  # the good one stays
    assert ckpt.load(str(tmp_path), warn=pytest.fail)["step"] == 2


def test_a_finished_runs_leftover_previous_is_neither_resumed_nor_kept(tmp_path):
    _save_steps(tmp_path, 1, 2)
    (tmp_path / ckpt.CKPT_NAME).unlink()  # what results.py does when the run finishes
    assert ckpt.load(str(tmp_path), warn=pytest.fail) is None
    _save_steps(tmp_path, 1)  # a new run in the same directory starts a fresh ring
    assert _files(tmp_path) == ["checkpoint.pt", "checkpoint.pt.json"]


def test_remove_deletes_every_checkpoint_file(tmp_path):
    _save_steps(tmp_path, 1, 2)
    (tmp_path / ".checkpoint.pt.k2j4h5g6.tmp").write_bytes(b"")
    (tmp_path / "results.json").write_text("{}")
    assert sorted(ckpt.remove(str(tmp_path))) == sorted(str(tmp_path / f) for f in RING)
    assert _files(tmp_path) == ["results.json"] and ckpt.load(str(tmp_path)) is None
    assert ckpt.remove(str(tmp_path)) == []


OURS = [".checkpoint.pt.a1b2c3d4.tmp", ".checkpoint.pt.json.x_y_z_12.tmp", ".checkpoint.prev.pt.qwertyui.tmp",
        ".checkpoint.prev.pt.json.zz99zz99.tmp"]
NOT_OURS = [".results.json.a1b2c3d4.tmp", "checkpoint.pt.tmp", ".checkpoint.pt.bak", ".checkpoint.pt.a.b.tmp",
            ".notes.txt.a1b2c3d4.tmp"]


@pytest.mark.parametrize("call", ["save", "load"])
def test_stale_temp_files_of_checkpoint_writes_are_removed(tmp_path, call):
    """A kill during a write leaves the writer's temp file (often 0 bytes: killed before torch.save wrote)."""
    _save_steps(tmp_path, 1)
    for name in OURS + NOT_OURS:
        (tmp_path / name).write_bytes(b"")
    if call == "save":
        _save_steps(tmp_path, 2)
    else:
        assert ckpt.load(str(tmp_path))["step"] == 1
    left = set(_files(tmp_path))
    assert left.isdisjoint(OURS) and left.issuperset(NOT_OURS)
