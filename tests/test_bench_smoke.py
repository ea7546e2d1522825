"""The GPU benchmark (experiments/bench/bench.py) in its CPU smoke mode: it runs end to end and writes
the JSON the lead's GPU run will write. Each test runs the script in a subprocess, as the lead does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bench" / "bench.py"
VARIANTS = ["floor", "peft_lora", "peft_adalora", "lora", "rslora", "adalora", "adalora_final"]
RATIOS = ["adalora/lora", "lora/floor", "adalora/floor", "adalora_mem/lora_mem", "peft_adalora/peft_lora",
          "adalora/peft_adalora", "lora/peft_lora"]
TIMES = ["median_ms", "p10_ms", "p90_ms"]


def run_bench(out: Path, *extra: str) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_smoke_all_workloads_and_variants(tmp_path):
    res, stdout = run_bench(tmp_path / "bench.json")
    for key in ("gpu", "torch", "transformers", "peft", "dtype", "settings", "workloads"):
        assert key in res
    assert res["dtype"]["base_weights"] == {"W1": "float32", "W2": "bfloat16", "W3": "bfloat16"}
    assert list(res["workloads"]) == ["W1", "W2", "W3"]
    for name, w in res["workloads"].items():
        assert list(w["variants"]) == VARIANTS, name
        for v, r in w["variants"].items():
            assert "error" not in r and "skipped" not in r, (name, v, r)
            assert all(isinstance(r[k], float) and r[k] > 0 for k in TIMES), (name, v)
            assert r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
            assert r["peak_gib"] is None  # no memory stats on a CPU
        assert set(RATIOS) <= set(w["ratios"])
        assert all(isinstance(w["ratios"][k], float) for k in RATIOS if "mem" not in k)
        assert w["ratios"]["adalora_mem/lora_mem"] is None
        # the smoke run measures eager variants only: each family's best is its eager one
        assert w["best"] == {f: {"mode": "eager", "ms": w["variants"][f]["median_ms"]} for f in ("floor", "lora", "adalora")}
        assert w["ratios_best"]["adalora/lora"] == round(w["variants"]["adalora"]["median_ms"] / w["variants"]["lora"]["median_ms"], 4)
        assert w["alloc_ms"] > 0 and 0 < w["alloc_share"]
        # the shrunk adapters hold exactly the final budget: target rank 8 per adapted matrix
        n = w["shape"]["adapted_matrices"]
        assert w["variants"]["adalora_final"]["ranks_after_shrink"]["total"] == 8 * n
        assert w["variants"]["adalora"]["trainable_params"] > w["variants"]["lora"]["trainable_params"]
    assert res["workloads"]["W1"]["shape"]["adapted_matrices"] == 12  # 6 types x 2 layers
    assert "| variant | median ms |" in stdout


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_smoke_compiled_shrunk_adapters_and_resume(tmp_path, backend):
    """Regional compilation of blocks whose adapters have different ranks after the shrink traces
    forward and backward; --resume keeps what was measured and adds the rest."""
    out = tmp_path / "bench.json"
    first, _ = run_bench(out, "--workloads", "W2", "--variants", "adalora_final+compile", "--compile-backend", backend)
    r = first["workloads"]["W2"]["variants"]["adalora_final+compile"]
    assert r["median_ms"] > 0 and r["ranks_after_shrink"]["total"] == 8 * 14
    second, _ = run_bench(out, "--workloads", "W2", "--variants", "lora,adalora_final+compile",
                          "--compile-backend", backend, "--resume")
    v = second["workloads"]["W2"]["variants"]
    assert list(v) == ["lora", "adalora_final+compile"]
    assert v["adalora_final+compile"] == r  # carried over, not measured again
    assert second["workloads"]["W2"]["ratios"]["adalora_final+compile/lora+compile"] is None


def _bench_module(script: Path = SCRIPT, name: str = "bench_script"):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_variant_names_and_run_order():
    bench = _bench_module()
    assert bench.split_variant("lora") == ("lora", False, "eager")
    assert bench.split_variant("adalora+fused+graph") == ("adalora", True, "graph")
    assert bench.split_variant("floor+compile") == ("floor", False, "compile")
    for bad in ("lora+graph+fused", "floor+fused", "peft_lora+graph", "lora+graph+compile", "nope"):
        with pytest.raises(ValueError, match="--variants"):
            bench.split_variant(bad)
    args = bench.parse_args(["--out", "x", "--workloads", "W1,W2", "--variants", "floor,lora,adalora", "--fused", "--graph"])
    order = [v for w, v in bench.jobs(args) if w == "W2"]
    assert order == ["floor", "lora", "adalora", "lora+fused", "adalora+fused",
                     "floor+graph", "lora+graph", "adalora+graph", "lora+fused+graph", "adalora+fused+graph"]
    assert [w for w, _ in bench.jobs(args)][:3] == ["W1", "W1", "W1"]  # eager variants of every workload first
    names = bench.all_variant_names()
    assert len(names) == len(set(names)) and set(order) <= set(names)
    # +ckpt: after +fused, before the mode; --ckpt adds the twin of every variant of the run
    assert bench.split_variant("adalora+fused+ckpt+graph") == ("adalora", True, "graph")
    assert bench.checkpointed("adalora+fused+ckpt+graph") and not bench.checkpointed("adalora+fused+graph")
    for bad in ("lora+ckpt+fused", "lora+graph+ckpt", "lora+ckpt+ckpt"):
        with pytest.raises(ValueError, match="--variants"):
            bench.split_variant(bad)
    args = bench.parse_args(["--out", "x", "--workloads", "W2", "--variants", "lora", "--fused", "--graph", "--ckpt"])
    order = [v for _, v in bench.jobs(args)]
    assert order == ["lora", "lora+fused", "lora+ckpt", "lora+fused+ckpt",
                     "lora+graph", "lora+fused+graph", "lora+ckpt+graph", "lora+fused+ckpt+graph"]
    assert set(order) <= set(names)
    args = bench.parse_args(["--out", "x", "--workloads", "W2", "--variants", "floor,lora", "--fused", "--compile"])
    assert [v for _, v in bench.jobs(args)] == ["floor", "lora", "lora+fused", "floor+compile", "lora+compile",
                                                "lora+fused+compile"]


def test_smoke_fused_and_checkpointed_variants(tmp_path):
    res, _ = run_bench(tmp_path / "bench.json", "--workloads", "W2", "--variants", "floor,lora,adalora", "--fused", "--ckpt")
    w = res["workloads"]["W2"]
    assert list(w["variants"]) == ["floor", "lora", "adalora", "floor+ckpt", "lora+ckpt", "adalora+ckpt", "lora+fused",
                                   "adalora+fused", "lora+fused+ckpt", "adalora+fused+ckpt"]
    assert all("error" not in r for r in w["variants"].values())
    assert all(isinstance(w["ratios"][k], float) for k in ("lora+fused/lora", "adalora+fused/lora+fused", "lora+fused/floor",
                                                           "lora+ckpt/lora", "adalora+fused+ckpt/adalora+fused"))
    assert w["ratios"]["adalora+ckpt_mem/adalora_mem"] is None  # no memory stats on a CPU
    # the fused and the checkpointed adapters train the same parameters
    assert w["variants"]["lora+fused"]["trainable_params"] == w["variants"]["lora"]["trainable_params"]
    assert w["variants"]["adalora+fused+ckpt"]["trainable_params"] == w["variants"]["adalora"]["trainable_params"]


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("kind,r", [("lora", 8), ("lora", 3), ("svd", 12)])
def test_layer_ab_candidates_compute_the_adapted_linear(kind, r, swap, lean):
    """layer_ab.py's candidates (its CUDA timing cannot run here): each computes base + adapter and its
    gradients, so an A/B between them compares implementations of one function."""
    import torch

    layer_ab = _bench_module(SCRIPT.with_name("layer_ab.py"), "layer_ab_script")
    torch.manual_seed(0)
    x = torch.randn(16, 24, requires_grad=True)
    w = torch.randn(40, 24)
    p1 = torch.randn(r, 24, requires_grad=True)
    p2 = torch.randn(40, r, requires_grad=True)
    lam = torch.randn(r, requires_grad=True) if kind == "svd" else None
    y = layer_ab._Cand.apply(x, x, w, None, p1, p2, lam, kind, 0.7, swap, lean)
    a = p1 * 0.7 if kind == "lora" else p1 * (lam * 0.7)[:, None]
    ref = x @ w.T + (x @ a.T) @ p2.T
    ins = [x, p1, p2] + ([lam] if lam is not None else [])
    gy = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, ins, gy), torch.autograd.grad(ref, ins, gy)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,r", [("lora", 8), ("svd", 12), ("lora", 5)])
def test_layer_ab_steps_give_the_unfused_gradients(kind, r, monkeypatch):
    """layer_ab.py's step for each implementation it times on a GPU (fused one by one, grouped as
    adarank/fast/siblings.py groups q/k/v and gate/up, and both inside grads_into_buffers), run on a CPU in fp32
    on tiny shapes: every one leaves the unfused step's gradients in the persistent buffers."""
    import torch

    layer_ab = _bench_module(SCRIPT.with_name("layer_ab.py"), "layer_ab_script")
    monkeypatch.setattr(layer_ab, "TOKENS", 32)
    shapes = (16, 8, 24, 2)  # hidden, kv, intermediate, blocks
    layers = layer_ab.make_layers(kind, r, torch.device("cpu"), shapes)
    for L in layers:
        L["w"] = L["w"].float()
    xs = [{k: v.detach().float().requires_grad_() for k, v in d.items()}
          for d in layer_ab.make_inputs(torch.device("cpu"), shapes)]
    leaves = layer_ab.params(layers) + [t for d in xs for t in d.values()]
    gys = [torch.randn(32, L["d_out"]) for L in layers]
    got = {}
    for impl in ("unfused", "fused", "grouped", "fused_into", "grouped_into"):
        for p in leaves:
            p.grad = torch.zeros_like(p)
        layer_ab.step_fn(impl, kind, layers, xs, gys)()
        got[impl] = [p.grad.clone() for p in leaves]
    for impl, grads in got.items():
        for a, b in zip(grads, got["unfused"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=impl)


def test_best_mode_of_each_family():
    """"best": the fastest measured variant of floor, lora and adalora (errors, skips, adalora_final and PEFT
    left out); "ratios_best": best over best."""
    bench = _bench_module()
    variants = {
        "floor": {"median_ms": 120.0}, "floor+graph": {"median_ms": 130.0}, "floor+compile": {"error": "OOM"},
        "lora": {"median_ms": 160.0}, "lora+fused+graph": {"median_ms": 140.0}, "lora+compile": {"skipped": "time"},
        "adalora": {"median_ms": 180.0}, "adalora+graph": {"median_ms": 165.0}, "adalora+fused+compile": {"median_ms": 150.0},
        "adalora_final+fused+graph": {"median_ms": 100.0}, "peft_lora": {"median_ms": 90.0},
    }
    best, ratios = bench.best_modes(variants)
    assert best == {"floor": {"mode": "eager", "ms": 120.0}, "lora": {"mode": "fused+graph", "ms": 140.0},
                    "adalora": {"mode": "fused+compile", "ms": 150.0}}
    assert ratios == {"lora/floor": round(140 / 120, 4), "adalora/lora": round(150 / 140, 4), "adalora/floor": 1.25}
    best, ratios = bench.best_modes({"lora": {"median_ms": 10.0}})
    assert best["floor"] is None and best["adalora"] is None and set(ratios.values()) == {None}
