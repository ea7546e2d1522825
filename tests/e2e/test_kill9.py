"""A run killed with SIGKILL (no cleanup, no exception handler runs) and resumed with `resume=true` ends
bit-identical to an uninterrupted run: killed after an optimizer step, during a checkpoint write, and with its
newest checkpoint then damaged by hand (the fallback to the previous one, end to end).

Each run is a real `python -m adarank.run` subprocess. A small driver patches it before the CLI starts: it
SIGKILLs itself at the N-th training forward pass (with grad_accum=1, during optimizer step N, after the
checkpoints of the earlier steps were written), or partway through the N-th checkpoint write (the temp file holds
part of the checkpoint, the old checkpoint is untouched). Every subprocess runs on one thread: the tiny matmuls
give different bits with 1 and 2 threads, and the comparison is bit for bit.

About 52-66 s on the busy 2-core CPU runner (7 CLI runs of 7-8 s each, most of it start-up).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adarank.runner import checkpoint as ckpt

from . import TINY

REPO = Path(__file__).resolve().parents[2]

# T=20, 64 examples in batches of 8: evaluations at 8, 16, 20; checkpoints every 3 steps (3, 6, ..., 18);
# adalora's final phase (the shrink) starts at step T - t_f = 16.
RUN = [*TINY, "method=adalora", "train.checkpoint_every=3"]
TIMINGS = ("seconds", "train_seconds", "steps_per_second")

DRIVER = r"""
import contextlib, os, runpy, signal, sys

def die():
    os.kill(os.getpid(), signal.SIGKILL)

kill_at_forward = int(os.environ.get("KILL9_AT_FORWARD", "0"))
kill_in_write = int(os.environ.get("KILL9_IN_CHECKPOINT_WRITE", "0"))
if kill_at_forward:
    import transformers
    cls = transformers.BertForSequenceClassification
    real_forward, forwards = cls.forward, [0]

    def forward(self, *args, **kwargs):
        if self.training:
            forwards[0] += 1
            if forwards[0] == kill_at_forward:
                die()
        return real_forward(self, *args, **kwargs)

    cls.forward = forward
if kill_in_write:
    from adarank.runner import checkpoint
    real_writer, writes = checkpoint.atomic_writer, [0]

    class DiesMidWrite:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            data = memoryview(data).cast("B")
            self.f.write(data[: max(1, len(data) // 2)])
            self.f.flush()
            os.fsync(self.f.fileno())
            die()

        def flush(self):
            self.f.flush()

    @contextlib.contextmanager
    def writer(path):
        writes[0] += 1
        with real_writer(path) as f:
            yield DiesMidWrite(f) if writes[0] == kill_in_write else f

    checkpoint.atomic_writer = writer
sys.argv = ["adarank.run", *sys.argv[1:]]
runpy.run_module("adarank.run", run_name="__main__", alter_sys=True)
"""


def _cli(cache: Path, out: Path, *overrides: str, **kill: int) -> subprocess.CompletedProcess:
    """One CLI run into `out`; kill=dict(KILL9_AT_FORWARD=n) or dict(KILL9_IN_CHECKPOINT_WRITE=n) makes it die."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_SILENT"):
        env.setdefault(flag, "1")
    env.update({k: str(v) for k, v in kill.items()})
    args = [*RUN, f"hydra.run.dir={out}", f"data.cache_dir={cache}", *overrides]
    proc = subprocess.run([sys.executable, "-c", DRIVER, *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    if kill:
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenised")


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "out"
    _cli(cache, out)
    return out


def _step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["step"]


def _temps(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".checkpoint*.tmp"))


def _assert_identical(got: Path, want: Path) -> None:
    """results.json equal but for timings (and the resume flag in its config); the adapter file byte-identical."""
    a, b = (json.loads((d / "results.json").read_text()) for d in (got, want))
    for res in (a, b):
        for key in TIMINGS:
            res.pop(key)
        res["config"].pop("resume")
    assert a == b
    adapter = Path("adapter") / "adapter_model.safetensors"
    assert (got / adapter).read_bytes() == (want / adapter).read_bytes()
    assert not (got / ckpt.CKPT_NAME).exists() and _temps(got) == []


def test_killed_after_the_shrink_resumes_from_the_shrunk_checkpoint(cache, uninterrupted, tmp_path):
    out = tmp_path / "out"
    _cli(cache, out, KILL9_AT_FORWARD=19)
    assert _step(out / ckpt.CKPT_NAME) == 18 and _step(out / ckpt.PREV_NAME) == 15
    assert torch.load(out / ckpt.CKPT_NAME, weights_only=False)["allocator"]["shrunk"]
    assert not (out / "results.json").exists()
    resumed = _cli(cache, out, "resume=true")
    assert "resumed from step 18" in resumed.stdout and "warning" not in resumed.stderr
    _assert_identical(out, uninterrupted)


def test_killed_during_a_checkpoint_write_resumes_from_the_one_before(cache, uninterrupted, tmp_path):
    out = tmp_path / "out"
    _cli(cache, out, KILL9_IN_CHECKPOINT_WRITE=5)  # the checkpoint of step 15, before the shrink
    (temp,) = _temps(out)
    assert temp.startswith(".checkpoint.pt.") and (out / temp).stat().st_size > 0  # part of the checkpoint
    assert _step(out / ckpt.CKPT_NAME) == 12 and _step(out / ckpt.PREV_NAME) == 12  # rotated, then killed
    resumed = _cli(cache, out, "resume=true")
    assert "resumed from step 12" in resumed.stdout and "warning" not in resumed.stderr
    _assert_identical(out, uninterrupted)  # and the temp file is gone


def test_a_damaged_newest_checkpoint_falls_back_and_redoes_the_steps_since_the_previous(cache, uninterrupted,
                                                                                         tmp_path):
    out = tmp_path / "out"
    _cli(cache, out, KILL9_AT_FORWARD=17)  # killed after the shrink began; the newest checkpoint (15) is before it
    newest, previous = out / ckpt.CKPT_NAME, out / ckpt.PREV_NAME
    assert _step(newest) == 15 and _step(previous) == 12
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated, as by a full disk or a bad copy
    resumed = _cli(cache, out, "resume=true")
    warnings = [line for line in resumed.stderr.splitlines() if "warning" in line]
    assert warnings == [(f"adarank: warning: checkpoint {newest} is unusable ({len(data) // 2} bytes, its sidecar "
                         f"{newest}.json says {len(data)}); resuming from the previous one, {previous} (step 12)")]
    assert "resumed from step 12" in resumed.stdout
    _assert_identical(out, uninterrupted)
