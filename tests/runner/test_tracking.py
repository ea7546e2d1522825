"""Tracker tests against real offline W&B runs, read back from the files wandb wrote.

wandb 0.31 writes no ``wandb-summary.json`` offline; everything is in ``run-<id>.wandb``, a
LevelDB-style log of ``wandb.proto`` ``Record`` messages. ``read_run`` decodes it, so the test
does not depend on wandb's finish-time behaviour or on any network.
"""

import json
import struct
import sys
from pathlib import Path

import pytest

from adarank.runner.tracking import Tracker

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402

BLOCK = 32 * 1024  # LevelDB log block size used by the .wandb writer
HEADER = 7  # ":W&B", magic 0xBEE1, version byte
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: Path):
    """Yield each protobuf ``Record`` of a ``.wandb`` file, joining records split across blocks."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = HEADER, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer too short for a header: zero padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (FULL, FIRST):
            pending = b""
        pending += chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def _to_dict(items) -> dict:
    """Items carry a ``key`` or, for media and nested values, a path of ``nested_key`` parts."""
    out: dict = {}
    for item in items:
        *parents, leaf = [item.key] if item.key else list(item.nested_key)
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = json.loads(item.value_json)
    return out


def read_run(run_file: Path) -> dict:
    """History rows by step, the latest summary values, the run record and its config."""
    history, summary, run = {}, {}, None
    for r in iter_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = _to_dict(r.history.item)
            history[row["_step"]] = row
        elif kind == "summary":
            summary.update(_to_dict(r.summary.update))
        elif kind == "run":
            run = r.run
    return {"history": history, "summary": summary, "run": run, "config": _to_dict(run.config.update)}


@pytest.fixture(autouse=True)
def quiet_offline_wandb(tmp_path, monkeypatch):
    for var, value in {"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
                       "WANDB_CONSOLE": "off", "WANDB_MODE": "offline"}.items():
        monkeypatch.setenv(var, value)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))  # keep ~/.config and ~/.cache clean


@pytest.fixture(scope="module", autouse=True)
def stop_wandb_service():
    yield
    wandb.teardown()  # the wandb-core service would otherwise outlive the tests


def _run_dirs(out_dir: Path, run_id: str) -> list[Path]:
    """The offline run folders of ``run_id``, once wandb has written them out."""
    # run.finish() returns before wandb-core has flushed and closed the .wandb file (seen
    # with 0.31: an empty file at that point); stopping the service waits for the flush.
    wandb.teardown()
    return sorted((out_dir / "wandb").glob(f"offline-run-*-{run_id}*"))


def test_offline_scalars_config_and_summary_are_written(tmp_path):
    tracker = Tracker(mode="offline", project="adarank-test", group="sweep1", job_type="train",
                      tags=["glue", "rte"], name="rte-adalora", config={"lr": 1e-3, "model": {"r": 8}},
                      out_dir=tmp_path / "run", run_id="t0run1")
    assert tracker.active and tracker.run_id == "t0run1"
    # Enough steps to span several 32 KiB blocks of the .wandb log.
    for step in range(1, 121):
        tracker.log({f"train/k{j}": step + j / 100 for j in range(20)} | {"train/loss": 1.0 / step}, step=step)
    tracker.summary({"final/accuracy": 0.75, "trainable_params": 1234})
    tracker.finish()
    tracker.finish()  # idempotent
    assert not tracker.active

    (run_dir,) = _run_dirs(tmp_path / "run", "t0run1")
    run_file = run_dir / "run-t0run1.wandb"
    assert run_file.stat().st_size > 3 * BLOCK
    got = read_run(run_file)
    assert sorted(got["history"]) == list(range(1, 121))
    assert got["history"][4]["train/loss"] == 0.25
    assert got["history"][120]["train/k19"] == pytest.approx(120.19)
    assert got["summary"]["final/accuracy"] == 0.75 and got["summary"]["trainable_params"] == 1234
    assert got["summary"]["train/loss"] == pytest.approx(1 / 120)
    assert got["config"]["lr"] == 1e-3 and got["config"]["model"] == {"r": 8}
    run = got["run"]
    assert (run.project, run.run_group, run.job_type) == ("adarank-test", "sweep1", "train")
    assert run.display_name == "rte-adalora"
    assert list(run.tags) == ["glue", "rte"]
    # If a wandb version does write the summary file, it must agree.
    summary_file = run_dir / "files" / "wandb-summary.json"
    if summary_file.exists():
        assert json.loads(summary_file.read_text())["final/accuracy"] == 0.75


def test_log_ranks_writes_table_heatmap_and_image(tmp_path):
    ranks = {"bert.encoder.layer.0.attention.self.query": 2, "bert.encoder.layer.1.attention.self.query": 6,
             "bert.encoder.layer.1.attention.self.value": 4}
    with Tracker(mode="offline", out_dir=tmp_path, run_id="t0ranks") as tracker:
        tracker.log({"budget": 12}, step=10)
        tracker.log_ranks(ranks, step=10)
        tracker.log_ranks({}, step=10)  # nothing to log
        tracker.log_image("plots/ranks_copy", tmp_path / "ranks" / "step_0000010.png")  # joins step 10
        tracker.log({"budget": 8}, step=20)

    assert (tmp_path / "ranks" / "step_0000010.png").read_bytes()[:4] == b"\x89PNG"
    (run_dir,) = _run_dirs(tmp_path, "t0ranks")
    row = read_run(run_dir / "run-t0ranks.wandb")["history"][10]
    assert row["budget"] == 12 and row["ranks/total"] == 12 and row["ranks/mean"] == 4
    assert row["ranks/heatmap"]["_type"] == "image-file"
    assert row["plots/ranks_copy"]["_type"] == "image-file"
    assert row["ranks/table"]["_type"] == "table-file"
    table = json.loads((run_dir / "files" / row["ranks/table"]["path"]).read_text())
    assert table["columns"] == ["module", "layer", "type", "rank"]
    assert ["bert.encoder.layer.1.attention.self.value", "1", "attention.self.value", 4] in table["data"]
    assert (run_dir / "files" / row["ranks/heatmap"]["path"]).read_bytes()[:4] == b"\x89PNG"


def test_resume_continues_the_same_run_id(tmp_path):
    with Tracker(mode="offline", out_dir=tmp_path, run_id="t0resume", resume=True) as first:
        first.log({"loss": 1.0}, step=1)
    with Tracker(mode="offline", out_dir=tmp_path, run_id="t0resume", resume=True) as second:
        assert second.run_id == "t0resume"
        second.log({"loss": 0.5}, step=5)

    # Offline, each session gets its own folder for the one run id; `wandb sync` merges them.
    dirs = _run_dirs(tmp_path, "t0resume")
    assert len(dirs) == 2
    steps = [sorted(read_run(d / "run-t0resume.wandb")["history"]) for d in dirs]
    assert sorted(steps) == [[1], [5]]
    assert all(read_run(d / "run-t0resume.wandb")["run"].run_id == "t0resume" for d in dirs)


@pytest.mark.parametrize("kwargs", [{"mode": "disabled"}, {"mode": "offline", "enabled": False}])
def test_disabled_tracker_does_nothing_and_needs_no_wandb(tmp_path, monkeypatch, kwargs):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` would now fail
    out = tmp_path / "out"
    tracker = Tracker(out_dir=out, run_id="keep", config={"a": 1}, **kwargs)
    assert not tracker.active and tracker.run_id == "keep"
    tracker.log({"loss": 1.0}, step=1)
    tracker.log_ranks({"model.layers.0.mlp.up_proj": 3}, step=1)
    tracker.log_image("x", tmp_path / "missing.png")
    tracker.summary({"a": 1})
    tracker.finish()
    assert not out.exists()


def test_rejects_unknown_mode(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        Tracker(mode="dryrun", out_dir=tmp_path)
