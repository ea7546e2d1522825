"""adarank/fast/kernels.py against cuBLAS on one workload's shapes, and a sweep of the kernels' tile configurations.

    python experiments/bench/kernel_sweep.py [--workload W3] [--out FILE.json] [--sweep]

For each adapted-matrix shape of bench.py's W2 or W3 (8 x 1024 tokens; out widths of q/o/down, k/v and
gate/up) and rank (LoRA 8, SVD 12 padded to 16), times in one process on one GPU:
- out: y = t·bᵀ, `kernels.lowrank_out` against `torch.mm` (t a column slice of a wider t, as in a group; the
  kernel reads b's fp32 parameter and writes the padded bf16 copy that backward reads, cuBLAS reads that copy);
- grads: grad_t = g·b and gb += alpha·gᵀ·t, `kernels.lowrank_grads` against `torch.mm` plus `fused._mm`
  (the split-K GEMM accumulating into an fp32 gradient), which is what fused.py runs without the kernels;
  and grad_t alone, both ways.
The rank is padded as fused.py pads it for the kernels (`KERNEL_ALIGN`), and t and grad_t are column
slices of a three-member group's stacked tensors.
Each timing is a CUDA graph of 20 calls over 4 rotating input sets (so that the inputs do not sit in L2),
replayed 30 times, the median per call in microseconds. With `--sweep` it also times every tile
configuration in `OUT_GRID` / `GRADS_GRID` and reports the best per shape. Every result is checked
against an fp32 reference first.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from adarank.fast import fused, kernels

TOKENS = 8 * 1024
#: (hidden, kv width, intermediate) of bench.py's Llama workloads
DIMS = {"W2": (2048, 256, 5632), "W3": (1024, 256, 2816)}
OUT_GRID = list(itertools.product((64, 128), (64, 128, 256), (4, 8), (1,)))
GRADS_GRID = list(itertools.product((64, 128), (64, 128, 256), (4, 8), (2, 3, 4)))
SETS, CALLS, REPS = 4, 20, 30


def per_call_us(fn) -> float:
    """Median µs of one fn() call, from CUDA-graph replays of CALLS calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for k in range(2):
            fn(k)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for k in range(CALLS):
            fn(k)
    for _ in range(3):
        g.replay()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(REPS + 1)]
    ev[0].record()
    for k in range(REPS):
        g.replay()
        ev[k + 1].record()
    torch.cuda.synchronize()
    return 1e3 * statistics.median(ev[k].elapsed_time(ev[k + 1]) for k in range(REPS)) / CALLS


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def case(out_width: int, rank: int, dev: torch.device, sweep: bool) -> dict:
    """Correctness and per-call times of both kernels against cuBLAS at one output width and rank."""
    o, r = out_width, rank
    rp = fused._padded(r, fused.KERNEL_ALIGN)
    dt = torch.bfloat16
    # t: a column slice of a group's stacked t, as fused.py passes it (three members' padded ranks wide)
    ts = [torch.randn(TOKENS, 3 * rp, device=dev, dtype=dt)[:, rp:2 * rp] for _ in range(SETS)]
    for t in ts:
        t[:, r:] = 0  # the padding columns of t are zeros (a's padding rows are)
    bp = torch.randn(o, r, device=dev) * 0.05  # the fp32 parameter, which the forward kernel reads
    b = torch.zeros(o, rp, device=dev, dtype=dt)  # its padded bf16 copy, which backward reads
    b[:, :r] = bp
    gs = [torch.randn(TOKENS, o, device=dev, dtype=dt) for _ in range(SETS)]
    gt_buf = torch.empty(TOKENS, 3 * rp, device=dev, dtype=dt)
    gt = gt_buf[:, rp:2 * rp]
    gb = torch.zeros(o, r, device=dev, dtype=torch.float32)
    res: dict = {"out": o, "rank": r}

    # correctness (fresh random inputs, poisoned outputs)
    bq = torch.full_like(b, float("nan"))
    y = kernels.lowrank_out(ts[0], bp, b_out=bq)
    res["out_rel_err"] = rel(y, ts[0].float() @ b.float().t())
    res["b_out_exact"] = bool(torch.equal(bq, b))
    gt_buf.fill_(float("nan"))
    gb.normal_()
    gb0 = gb.clone()
    kernels.lowrank_grads(gs[0], b, ts[0], gt, gb, 0.5)
    res["grad_t_rel_err"] = rel(gt, gs[0].float() @ b.float())
    res["grad_b_rel_err"] = rel(gb, gb0 + 0.5 * gs[0].float().t() @ ts[0][:, :r].float())
    res["poison_left"] = bool(torch.isnan(gt).any())

    res["out_cublas_us"] = per_call_us(lambda k: torch.mm(ts[k % SETS], b.t()))
    res["out_triton_us"] = per_call_us(lambda k: kernels.lowrank_out(ts[k % SETS], bp, b_out=bq))

    def cublas_grads(k):
        torch.mm(gs[k % SETS], b, out=gt)
        fused._mm(gs[k % SETS].t(), ts[k % SETS][:, :r], torch.float32, 0.5, acc=gb)

    res["grads_cublas_us"] = per_call_us(cublas_grads)
    res["grads_triton_us"] = per_call_us(lambda k: kernels.lowrank_grads(gs[k % SETS], b, ts[k % SETS], gt, gb, 0.5))
    res["grad_t_only_triton_us"] = per_call_us(lambda k: kernels.lowrank_grads(gs[k % SETS], b, ts[k % SETS], gt, None))
    res["grad_t_only_cublas_us"] = per_call_us(lambda k: torch.mm(gs[k % SETS], b, out=gt))
    bytes_g = TOKENS * o * 2
    res["grads_triton_TBps_of_g"] = round(bytes_g / res["grads_triton_us"] / 1e6, 2)
    res["out_triton_TBps_of_y"] = round(bytes_g / res["out_triton_us"] / 1e6, 2)
    if sweep:
        default_out, default_grads = kernels.OUT_CONFIG, kernels.GRADS_CONFIG
        outs, grads = {}, {}
        for cfg in OUT_GRID:
            kernels.OUT_CONFIG = cfg
            outs[str(cfg)] = per_call_us(lambda k: kernels.lowrank_out(ts[k % SETS], bp, b_out=bq))
        for cfg in GRADS_GRID:
            kernels.GRADS_CONFIG = cfg
            try:
                grads[str(cfg)] = per_call_us(lambda k: kernels.lowrank_grads(gs[k % SETS], b, ts[k % SETS], gt, gb, 0.5))
            except Exception as e:  # noqa: BLE001 - a configuration that does not compile (shared memory) is skipped
                grads[str(cfg)] = repr(e)[:80]
        kernels.OUT_CONFIG, kernels.GRADS_CONFIG = default_out, default_grads
        timed = {k: v for k, v in grads.items() if isinstance(v, float)}
        res["out_best"] = sorted(outs.items(), key=lambda kv: kv[1])[:3]
        res["grads_best"] = sorted(timed.items(), key=lambda kv: kv[1])[:3]
        res["out_sweep"], res["grads_sweep"] = outs, grads
    for k in list(res):
        if isinstance(res[k], float):
            res[k] = round(res[k], 4)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=sorted(DIMS), default="W3")
    ap.add_argument("--out")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    H, KV, I = DIMS[args.workload]
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "workload": args.workload,
              "tokens": TOKENS, "out_config": kernels.OUT_CONFIG, "grads_config": kernels.GRADS_CONFIG, "cases": []}
    import triton
    result["triton"] = triton.__version__
    for o in sorted({H, KV, I}):
        for r in (8, 12):
            c = case(o, r, dev, args.sweep)
            print(json.dumps({k: v for k, v in c.items() if not k.endswith("_sweep")}), flush=True)
            result["cases"].append(c)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
