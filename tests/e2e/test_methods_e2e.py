"""Real short runs: every method for 20 steps, and every experiment file in fast mode."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import adarank.runner.data
import adarank.runner.cli
from adarank.inject import svd_adapters
from adarank.schedule import budget_at

from . import GLUE_FIXTURES, TINY, capture_models, compose_config, one_thread, run, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

RESULT_KEYS = {
    "experiment", "task", "method", "model", "budget", "seed", "metric", "value", "best_value", "metrics",
    "trainable_params", "trainable_share", "trainable_params_final", "steps", "seconds", "final_ranks",
    "budget_curve", "config", "train_seconds", "steps_per_second", "world_size", "evals", "train_log",
    "git_sha", "code_sha256", "versions", "device",
    "lr", "alpha",  # the learning rate and α that applied (recorded since the renovation, issue 16)
    "allocation_events", "kept_triplets",  # the ranks at each masking event, the final kept triplets (issue 19)
    "compile", "cuda_graph",  # what train.compile compiled, what train.cuda_graph captured (issue 21)
    "peak_gpu_memory_bytes",  # each rank's peak allocated GPU memory, null on a CPU (issue 23)
    "speed",  # the mode train.speed chose, and why (issue 21)
}
METHODS = ("full", "lora", "rslora", "adalora", "svd", "peft_lora", "peft_adalora")
EXPERIMENTS = sorted(p.stem for p in Path(adarank.runner.cli.CONF_DIR, "experiment").glob("*.yaml"))

# The tiny random BERT under config.yaml's method.r=2: 2 layers x 6 adapted matrices (q, k, v, attention
# output, FFN in, FFN out), initial rank ceil(1.5 x 2) = 3, so the budget goes from 36 to 24 triplets.
N_MODULES, R, INIT_RANK = 12, 2, 3
T, T_INIT, T_FINAL = 20, 2, 4  # init_frac 0.1 and final_frac 0.2 of T


def _finite_numbers(d: dict) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for k, v in d.items() if k != "step")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_20_steps(tmp_path, monkeypatch, method):
    models = capture_models(monkeypatch)
    res = run(tiny_config(tmp_path, f"method={method}"), tmp_path / "out")

    assert set(res) == RESULT_KEYS
    assert (res["experiment"], res["task"], res["method"], res["model"], res["seed"]) == (
        "quickstart", "tweets", method, "tiny_random", 0)
    assert res["steps"] == T and res["metric"] == "accuracy"
    assert res["budget"] == (None if method == "full" else R)
    for key in ("value", "best_value", "trainable_share", "seconds"):
        assert math.isfinite(res[key]), key
    assert _finite_numbers(res["metrics"]["final"]) and _finite_numbers(res["metrics"]["best"])
    assert res["metrics"]["final"]["step"] == T and 1 <= res["metrics"]["best_step"] <= T
    assert res["value"] == res["metrics"]["final"]["validation/accuracy"]
    assert res["trainable_params"] > 0
    if method == "full":
        assert res["trainable_share"] == 1.0
    else:  # of the base model only: PEFT's adapters and module copies do not count as base
        assert 0 < res["trainable_share"] < 0.01
    assert res["config"]["method"]["name"] == method and res["versions"]["torch"]
    # the local record: every logged step (log_every=10 -> steps 10 and 20), every evaluation, the throughput
    assert [e["step"] for e in res["train_log"]] == [10, 20]
    assert all(math.isfinite(e["train/loss"]) and e["train/lr"] >= 0 for e in res["train_log"])
    if method in ("lora", "rslora", "adalora", "svd"):  # the monitor watches our adapters (PEFT's are its own)
        assert all(e["norm/max"] >= e["norm/mean"] > 0 for e in res["train_log"])
    assert res["evals"][-1] == res["metrics"]["final"]
    assert 0 < res["train_seconds"] < res["seconds"] and res["steps_per_second"] > 0 and res["world_size"] == 1
    assert not (tmp_path / "out" / "checkpoint.pt").exists()  # removed once the run finished

    if method not in ("adalora", "peft_adalora"):
        assert res["final_ranks"] == {} and res["budget_curve"] == []
        return
    init_total, target_total = INIT_RANK * N_MODULES, R * N_MODULES
    assert len(res["final_ranks"]) == N_MODULES
    assert sum(res["final_ranks"].values()) == target_total
    # the cubic schedule, step by step: from the initial total to the target total
    assert res["budget_curve"] == [[t, budget_at(t, init_total, target_total, T_INIT, T_FINAL, T)[0]] for t in range(1, T + 1)]
    assert res["budget_curve"][0][1] == init_total and res["budget_curve"][-1][1] == target_total
    assert (tmp_path / "out" / "rank_heatmap.png").is_file() and (tmp_path / "out" / "budget_curve.png").is_file()

    if method == "adalora":  # shrink=true: pruned triplets are gone from the parameters themselves
        (model,) = models
        layers = dict(svd_adapters(model))
        assert {name: m.r for name, m in layers.items()} == res["final_ranks"]
        assert all(m.lam.shape == (m.r,) and m.P.shape[1] == m.Q.shape[0] == m.r for m in layers.values())
        adapter_params = sum(m.r * (m.in_features + m.out_features + 1) for m in layers.values())
        initial = sum(INIT_RANK * (m.in_features + m.out_features + 1) for m in layers.values())
        assert adapter_params < initial
        final = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
        assert final == res["trainable_params_final"] < res["trainable_params"]


def test_adalora_without_shrink_keeps_the_shapes_and_masks(tmp_path, monkeypatch):
    models = capture_models(monkeypatch)
    res = run(tiny_config(tmp_path, "method=adalora", "method.shrink=false", "train.max_steps=10"), tmp_path / "out")
    (model,) = models
    layers = dict(svd_adapters(model))
    assert all(m.r == INIT_RANK for m in layers.values())
    assert {name: int((m.lam != 0).sum()) for name, m in layers.items()} == res["final_ranks"]
    assert sum(res["final_ranks"].values()) == R * N_MODULES


#: Fast-mode steps where 3 cannot hold the experiment's schedule (the official MRPC and CoLA scripts spend 52%
#: of T at the final budget: at T=3 it would start at step 1).
FAST_STEPS = {"glue_paper_cola": 4, "glue_paper_mrpc": 4}
#: increlora (in the allocators sweeps) grows every delta_t = 10 steps in 60% of T: 40 steps hold the 2 growth
#: steps the tiny model's budget needs (12 triplets, top_h = 10)
FAST_STEPS |= {f"allocators_{task}": 40 for task in ("sst2", "cola", "mrpc")}


def _experiment_overrides(name: str, tmp_path: Path) -> list[str]:
    # The GLUE fixtures hold 1-5 training rows: half of them are carved off as the validation split.
    return [f"+experiment={name}", f"data.dir={GLUE_FIXTURES}", "data.val_fraction=0.5",
            f"train.max_steps={FAST_STEPS.get(name, 3)}", "data.max_train_samples=64", "data.max_eval_samples=32"]


CAUSAL = {name for name in EXPERIMENTS if name.startswith(("rank_search_bbc", "qlora_bbc"))}


def _fast_config(tmp_path: Path, name: str, *extra: str):
    """The experiment on the tiny random model of its kind: a BERT, or a Llama for causal-LM tasks."""
    base = [("model=tiny_llama" if name in CAUSAL and o == "model=tiny_random" else o) for o in TINY]
    return adarank.runner.cli.to_config(compose_config(
        [*base, f"data.cache_dir={tmp_path / 'cache'}", *_experiment_overrides(name, tmp_path), *extra]))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_runs_in_fast_mode(tmp_path, name):
    cfg = _fast_config(tmp_path, name)
    assert cfg.experiment_name == name and cfg.model.name == ("tiny_llama" if name in CAUSAL else "tiny_random")
    steps = FAST_STEPS.get(name, 3)
    assert adarank.runner.cli.preflight(cfg) == steps
    res = run(cfg, tmp_path / "out")
    assert res["steps"] == steps and res["experiment"] == name and res["task"] == cfg.task.name
    assert math.isfinite(res["value"])


def _sweep_values(name: str) -> list[str]:
    params = compose_config([f"+experiment={name}"], hydra_config=True).hydra.sweeper.params or {}
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [f"{o.get_key_element()}={v}" for o in parsed for v in o.sweep_string_iterator()]


#: Sweep values that need an optional extra (the package it installs): where it is not installed, preflight
#: must refuse them in one line naming the field instead.
NEEDS_EXTRA = {"model.quantization=nf4": "torchao"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_sweep_params_of_every_experiment_are_valid_overrides(tmp_path, name):
    values = _sweep_values(name)
    if name != "quickstart":
        assert values, f"{name} declares no hydra.sweeper.params"
    for value in values:
        cfg = _fast_config(tmp_path, name, value)
        key, _, want = value.partition("=")
        got = OmegaConf.select(OmegaConf.structured(cfg), key)
        assert str(got.name if OmegaConf.is_config(got) else got) == want, value
        if value in NEEDS_EXTRA and importlib.util.find_spec(NEEDS_EXTRA[value]) is None:
            with pytest.raises(ValueError, match=rf"^{re.escape(key)}: .*needs {NEEDS_EXTRA[value]}"):
                adarank.runner.cli.preflight(cfg)
            continue
        adarank.runner.cli.preflight(cfg)


@pytest.mark.parametrize("task", ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"])
def test_every_glue_task_runs_on_the_fixtures(tmp_path, task):
    cfg = tiny_config(tmp_path, f"task={task}", f"data.dir={GLUE_FIXTURES}", "data.val_fraction=0.5",
                      "method=lora", "train.max_steps=3")
    res = run(cfg, tmp_path / "out")
    spec = adarank.runner.data.get_task(task)
    assert res["metric"] == spec.main_metric and res["steps"] == 3 and math.isfinite(res["value"])
    # every official dev split is evaluated (MNLI: matched and mismatched); the first one is reported
    assert {f"{s}/{spec.main_metric}" for s in ("val", *spec.dev_splits)} <= set(res["metrics"]["final"])
    assert res["value"] == res["metrics"]["final"][f"{spec.dev_splits[0]}/{spec.main_metric}"]


def test_budget_reported_for_a_total_rank_target(tmp_path):
    """results.json's budget is the final average rank, also when the target was given as a total."""
    res = run(tiny_config(tmp_path, "method=adalora", f"method.target_total_rank={3 * N_MODULES}",
                          "method.init_rank=4", "train.max_steps=10"), tmp_path / "out")
    assert res["budget"] == 3 and sum(res["final_ranks"].values()) == 3 * N_MODULES
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()  # the trained adapter is saved


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method,extra", [("lora", []), ("adalora", []), ("adalora", ["method.fused=true"]),
                                          ("peft_adalora", []),
                                          ("increlora", ["method.fused=true", "method.delta_t=2", "method.top_h=4"])])
def test_cuda_graph_training_runs_the_same_schedule_as_eager(tmp_path, method, extra):
    """train.cuda_graph=true through the runner: the same steps, budget and ranks as the eager loop, and a
    loss curve that follows it (the capturable optimizer and graph-replayed dropout differ in the last bits,
    so the comparison is not bitwise; tests/test_graphs.py compares a replay with the eager step exactly)."""
    # GLUE fixture files: the GPU machine has no tweets package
    common = [f"method={method}", "train.device=cuda", "train.log_every=1", "task=sst2", f"data.dir={GLUE_FIXTURES}",
              "data.val_fraction=0.5", *extra]
    eager = run(tiny_config(tmp_path, *common, "train.speed=eager"), tmp_path / "eager")  # not auto's choice
    graph = run(tiny_config(tmp_path, *common, "train.cuda_graph=true"), tmp_path / "graph")
    assert graph["steps"] == eager["steps"] == T
    assert graph["budget_curve"] == eager["budget_curve"]
    if method in ("adalora", "increlora"):
        assert sum(graph["final_ranks"].values()) == sum(eager["final_ranks"].values())
    a = [e["train/loss"] for e in eager["train_log"]]
    b = [e["train/loss"] for e in graph["train_log"]]
    assert len(a) == len(b) == T
    assert all(math.isfinite(x) for x in b)
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.05 * max(abs(x) for x in a)
    assert graph["config"]["train"]["cuda_graph"] is True


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_fused_adapters_train_like_the_unfused_ones(tmp_path, method):
    """method.fused through the runner (CPU, fp32): the same schedule and ranks, and a loss curve equal to
    fp32 rounding."""
    plain = run(tiny_config(tmp_path, f"method={method}", "train.log_every=1"), tmp_path / "plain")
    fused = run(tiny_config(tmp_path, f"method={method}", "train.log_every=1", "method.fused=true"), tmp_path / "fused")
    assert fused["config"]["method"]["fused"] is True and plain["config"]["method"]["fused"] is False
    assert fused["budget_curve"] == plain["budget_curve"]
    a = [e["train/loss"] for e in plain["train_log"]]
    b = [e["train/loss"] for e in fused["train_log"]]
    assert len(a) == len(b) == T
    assert b == pytest.approx(a, rel=1e-4)
    if method == "adalora":
        assert sum(fused["final_ranks"].values()) == sum(plain["final_ranks"].values())
