"""Profile the parts of adalora's step that LoRA does not have, alone, on one workload's adapters.

    python experiments/bench/parts.py --workload W2 --out DIR [--steps 20]

Builds the workload's model with adalora applied (as bench.py does), trains a few steps so that
gradients and importance are real, then times and profiles (torch.profiler, CUDA time per kernel):
the orthogonal regulariser's gradient (`OrthGrad`) and one allocator step with masking. Writes
`DIR/parts_<workload>.json` (medians, synchronised) and one profiler table per part. This is how
experiments/bench/NOTES.md locates where adalora's extra time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

from adarank.atomic import atomic_write_json, atomic_write_text


def timed(fn, device: torch.device, n: int) -> float:
    """Median ms of `fn()` over n calls, synchronised around each."""
    out = []
    for _ in range(n):
        bench.sync(device)
        t0 = time.perf_counter()
        fn()
        bench.sync(device)
        out.append(1e3 * (time.perf_counter() - t0))
    return float(np.median(out))


def profiled(fn, device: torch.device, n: int, path: str, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            fn()
        bench.sync(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    atomic_write_text(path, f"# {title}: {n} calls\n" + prof.key_averages().table(sort_by=sort, row_limit=25) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="W2", choices=list(bench.WORKLOADS))
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(args.out, exist_ok=True)
    wl = bench.WORKLOADS[args.workload]
    model = bench.build_model(wl, args.smoke, device)
    batch = bench.make_batch(wl, model.config.vocab_size, bench.SMOKE_BATCH if args.smoke else wl.batch, device)
    rig = bench.build_rig("adalora", model, wl, device)
    for _ in range(3):
        bench.train_step(rig, batch)
    # gradients of one more step, kept: the parts below read them
    rig.step.micro(rig.fwd, batch)

    res = {"workload": wl.name, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "steps": args.steps}
    parts = {"orth_grad": rig.step.orth_grad, "allocator_step": rig.step.allocator.step}
    for name, fn in parts.items():
        fn()  # warm
        res[f"{name}_ms"] = timed(fn, device, args.steps)
        profiled(fn, device, 5, os.path.join(args.out, f"parts_{wl.name}_{name}.txt"), f"{wl.name} {name}")
    atomic_write_json(os.path.join(args.out, f"parts_{wl.name}.json"), res)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
