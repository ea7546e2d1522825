"""train.speed (adarank/runner/speed.py): the decision table, what a run records, and on a GPU every mode
against eager."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from adarank.runner import speed
from adarank.runner.speed import MODES, Facts, Mode, check_request, decide

from e2e import GLUE_FIXTURES, one_thread, run, tiny_config  # noqa: F401

#: a run auto would speed up: adalora on one GPU under bf16, a BERT
GPU_RUN = Facts(device_type="cuda", world_size=1, precision="bf16", model_type="bert", fusable=True, grows=False,
                peft=False, quantized=False)
EAGER = MODES["eager"]
FUSED_GRAPH = Mode(fused=True, cuda_graph=True)  # the buckets left as configured

# (what differs from GPU_RUN, the mode auto picks, a word its reason must contain)
TABLE = [
    ({}, FUSED_GRAPH, "fastest measured"),
    ({"device_type": "cpu"}, EAGER, "not a CUDA device"),
    ({"model_type": "deberta-v2"}, EAGER, "DeBERTa-v2"),
    ({"precision": "fp16"}, EAGER, "GradScaler"),
    ({"world_size": 2}, EAGER, "2 processes"),
    ({"quantized": True}, EAGER, "NF4"),
    ({"fusable": False}, EAGER, "no fast mode"),  # full fine-tuning
    ({"fusable": False, "peft": True}, EAGER, "no fast mode"),
    ({"grows": True}, EAGER, "increlora"),
    ({"precision": None}, FUSED_GRAPH, "fastest measured"),  # fp32 autocast off: graphs still run
    ({"model_type": "llama"}, Mode(fused=True, cuda_graph=True), "fastest measured"),  # a causal LM
]


@pytest.mark.parametrize("change,mode,word", TABLE, ids=[str(c) for c, _, _ in TABLE])
def test_auto_picks(change, mode, word):
    choice = decide("auto", EAGER, dataclasses.replace(GPU_RUN, **change))
    assert choice.mode == mode and word in choice.reason
    assert choice.record() == {"requested": "auto", "mode": mode.name, "reason": choice.reason}


def test_named_modes_and_hand_set_switches():
    for name, mode in MODES.items():  # a named mode is that mode, on any device
        assert decide(name, EAGER, GPU_RUN).mode == mode and mode.name == name
        assert decide(name, EAGER, dataclasses.replace(GPU_RUN, device_type="cpu")).mode == mode
    # under auto a switch set by hand means the user chose: kept as set, nothing added
    assert decide("auto", Mode(compile=True), GPU_RUN).mode == Mode(compile=True)
    assert decide("auto", Mode(fused=True), dataclasses.replace(GPU_RUN, device_type="cpu")).mode == Mode(fused=True)
    assert set(MODES) == {"eager", "fused", "graph", "fused+graph", "compile", "fused+compile"}


@pytest.mark.parametrize("speed_,hand,words", [
    ("fast", EAGER, ["train.speed", "must be one of", "'fast'"]),
    ("eager", Mode(cuda_graph=True), ["train.speed", "eager contradicts train.cuda_graph=true"]),
    ("graph", Mode(fused=True, compile=True), ["train.speed", "method.fused=true, train.compile=true"]),
])
def test_contradictions_are_refused(speed_, hand, words):
    with pytest.raises(ValueError) as e:
        check_request(speed_, hand)
    assert all(w in str(e.value) for w in words), str(e.value)
    check_request("fused+graph", Mode(fused=True))  # a switch the mode has is no contradiction


@pytest.mark.parametrize("overrides,words", [
    (["train.speed=fast"], ["train.speed", "must be one of"]),
    (["train.speed=eager", "method.fused=true"], ["train.speed", "contradicts method.fused=true"]),
    (["train.speed=fused", "method=full"], ["train.speed", "full does not have"]),
    (["train.speed=graph", "train.precision=fp16"], ["train.speed", "fp16"]),
])
def test_config_refuses(tmp_path, overrides, words):
    with pytest.raises(Exception) as e:
        tiny_config(tmp_path, *overrides)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_on_a_cpu_auto_changes_nothing(tmp_path):
    cfg = tiny_config(tmp_path)
    assert cfg.train.speed == "auto"
    resolved, choice = speed.resolve(cfg, "cpu", 1, None)
    assert resolved == cfg and choice.mode == EAGER
    with pytest.raises(ValueError, match=r"^train.speed: graph needs one CUDA device and one process, got cpu"):
        speed.resolve(tiny_config(tmp_path, "train.speed=graph"), "cpu", 1, None)
    gpu, choice = speed.resolve(cfg, "cuda", 1, torch.bfloat16)  # decided from the config alone: nothing runs
    assert (gpu.method.fused, gpu.train.cuda_graph, gpu.train.compile, gpu.data.length_buckets) == (True, True, False, "none")
    assert gpu.train.speed == "auto" and choice.mode == FUSED_GRAPH
    kept, _ = speed.resolve(tiny_config(tmp_path, "data.length_buckets=[32,64]"), "cuda", 1, torch.bfloat16)
    assert kept.data.length_buckets == [32, 64]  # the user's buckets kept


@pytest.mark.usefixtures("one_thread")
def test_results_record_the_mode(tmp_path):
    auto = run(tiny_config(tmp_path, "train.max_steps=3"), tmp_path / "auto")
    assert auto["speed"] == {"requested": "auto", "mode": "eager", "reason": "not a CUDA device"}
    fused = run(tiny_config(tmp_path, "train.max_steps=3", "train.speed=fused"), tmp_path / "fused")
    assert fused["speed"] == {"requested": "fused", "mode": "fused", "reason": "named in train.speed"}
    assert fused["config"]["method"]["fused"] is True and auto["config"]["method"]["fused"] is False
    assert fused["config"]["train"]["speed"] == "fused"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fast modes need a GPU")
@pytest.mark.parametrize("mode", ["auto", *[m for m in MODES if m != "eager"]])
def test_every_mode_trains_like_eager(tmp_path, mode):
    """20 optimizer steps of adalora on the tiny BERT with a shrink at the final budget (step 16): the same
    schedule and ranks as eager, the losses equal up to bf16 rounding. One-row batches, so every batch is a
    full one that compile compiles (a shorter one runs eagerly), bucketed to pow2 widths in every mode."""
    common = ["method=adalora", "train.device=cuda", "train.log_every=1", "task=sst2", f"data.dir={GLUE_FIXTURES}",
              "data.val_fraction=0.5", "train.batch_size=1", "data.length_buckets=pow2"]
    eager = run(tiny_config(tmp_path, *common, "train.speed=eager"), tmp_path / "eager")
    fast = run(tiny_config(tmp_path, *common, f"train.speed={mode}"), tmp_path / "fast")
    assert fast["speed"]["mode"] == ("fused+graph" if mode == "auto" else mode)
    assert fast["steps"] == eager["steps"] == 20 and fast["budget_curve"] == eager["budget_curve"]
    assert fast["trainable_params_final"] == eager["trainable_params_final"] < fast["trainable_params"]  # shrunk
    assert sum(fast["final_ranks"].values()) == sum(eager["final_ranks"].values())
    a = [e["train/loss"] for e in eager["train_log"]]
    b = [e["train/loss"] for e in fast["train_log"]]
    assert len(a) == len(b) == 20 and all(math.isfinite(x) for x in b)
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05 * max(abs(x) for x in a)
