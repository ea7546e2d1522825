"""One GPU against N GPUs (DDP or FSDP through torchrun) at the same global batch: loss curves, masks,
throughput, peak memory per GPU.

    python experiments/ddp/compare.py --out results/ddp/h200x2.json [--gpus 2] [--global-batch 32 128]
        [--distributed fsdp] [-- EXTRA HYDRA OVERRIDES]
    python experiments/ddp/compare.py --out results/ddp/h200x2.json --replot     (the PNG again, from the JSON)

For each global batch B it runs the same adalora experiment twice, with the official CLI:
  * `python -m adarank.run ... train.batch_size=B` on GPU 0;
  * `torchrun --nproc_per_node=N -m adarank.run ... train.batch_size=B/N train.check_masks=true`
    (`--distributed fsdp` adds `train.distributed=fsdp`: the frozen base sharded; the JSON's key is then "fsdp").
Rank r of the DDP job takes rows r, r+N, ... of the same shuffled order, so every optimizer step sees the
same B rows in both runs. Dropout is switched off (model.config_overrides), so the two runs differ only by
floating-point reduction order, and the comparison can be strict. `check_masks=true` makes the DDP run
gather the allocator's mask from every rank after every optimizer step and stop if any differs.

The JSON holds, per global batch: the commands, the logged train-loss curves and their largest
difference, the final dev/val metrics, the final ranks of every module (and whether they are equal), the
largest difference between the saved adapter weights, and steps per second of the training steps alone
(no evaluation), whose ratio is the throughput scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adarank.atomic import atomic_write_json

BASE = [
    "+experiment=glue_minilm_sst2", "method=adalora", "method.r=2", "seed=0",
    "data.max_train_samples=20000", "train.epochs=1", "train.eval_every=250", "train.log_every=5",
    "+model.config_overrides.hidden_dropout_prob=0.0", "+model.config_overrides.attention_probs_dropout_prob=0.0",
    "wandb.mode=disabled", "train.progress=false", "overwrite=true",
]
LOSS_TOL = 0.02  # the largest |Δ train loss| (mean over the logged window) we call agreement, dropout off


def run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed with exit code {proc.returncode}; see {log}")
    return time.time() - t0


def adapter_diff(a: Path, b: Path) -> float | None:
    from safetensors.torch import load_file

    fa, fb = a / "adapter" / "adapter_model.safetensors", b / "adapter" / "adapter_model.safetensors"
    if not (fa.exists() and fb.exists()):
        return None
    ta, tb = load_file(str(fa)), load_file(str(fb))
    if ta.keys() != tb.keys() or any(ta[k].shape != tb[k].shape for k in ta):
        return float("inf")  # different ranks: the shapes themselves differ
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


def compare(single: dict, multi: dict) -> dict:
    la = {e["step"]: e["train/loss"] for e in single["train_log"]}
    lb = {e["step"]: e["train/loss"] for e in multi["train_log"]}
    steps = sorted(set(la) & set(lb))
    diffs = [abs(la[s] - lb[s]) for s in steps]
    ranks_equal = single["final_ranks"] == multi["final_ranks"]
    return {
        "logged_steps_compared": len(steps),
        "max_abs_loss_diff": max(diffs) if diffs else None,
        "mean_abs_loss_diff": sum(diffs) / len(diffs) if diffs else None,
        "loss_tolerance": LOSS_TOL,
        "loss_curves_agree": bool(diffs) and max(diffs) <= LOSS_TOL,
        "final_ranks_equal": ranks_equal,
        "modules_with_different_rank": sorted(k for k in single["final_ranks"] if single["final_ranks"][k] != multi["final_ranks"].get(k)),
        "dev_value": [single["value"], multi["value"]],
        "best_value": [single["best_value"], multi["best_value"]],
        "throughput_scaling": multi["steps_per_second"] / single["steps_per_second"],
        "steps_per_second": [single["steps_per_second"], multi["steps_per_second"]],
        "samples_per_second": [single["steps_per_second"] * single["global_batch"], multi["steps_per_second"] * multi["global_batch"]],
    }


def plot(report: dict, png: str) -> None:
    """Train-loss curves, one panel per global batch: 1 GPU against N GPUs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = report["by_global_batch"]
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 3.8), squeeze=False)
    for ax, (B, e) in zip(axes[0], batches.items()):
        for kind, style in (("single", "-"), (report.get("distributed", "ddp"), "--")):
            steps, loss = zip(*e[kind]["loss_curve"])
            label = "1 GPU" if kind == "single" else f"{report['gpus']} GPUs ({kind.upper()})"
            ax.plot(steps, loss, style, label=f"{label}, batch {int(B) // e[kind]['world_size']} per GPU")
        c = e["comparison"]
        ax.set_title(f"global batch {B}: max |Δ loss| {c['max_abs_loss_diff']:.1e}, ranks equal: {c['final_ranks_equal']}",
                     fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("train loss (mean over 5 steps)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="the JSON to write (atomically)")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG next to an existing --out JSON")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--global-batch", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--distributed", choices=("ddp", "fsdp"), default="ddp", help="train.distributed of the N-GPU run")
    ap.add_argument("--workdir", default="outputs/ddp_compare")
    ap.add_argument("extra", nargs="*", help="more Hydra overrides for both runs (after --)")
    args = ap.parse_args()
    png = str(Path(args.out).with_suffix(".png"))
    if args.replot:
        plot(json.loads(Path(args.out).read_text()), png)
        return

    import torch

    if torch.cuda.device_count() < args.gpus:
        sys.exit(f"--gpus {args.gpus}: only {torch.cuda.device_count()} CUDA devices are visible")
    work = ROOT / args.workdir
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "gpu": torch.cuda.get_device_name(0), "gpus": args.gpus, "torch": torch.__version__, "distributed": args.distributed,
        "base_overrides": BASE + args.extra, "by_global_batch": {},
    }
    for B in args.global_batch:
        if B % args.gpus:
            sys.exit(f"--global-batch {B}: not divisible by --gpus {args.gpus}")
        entry: dict = {}
        results = {}
        multi = args.distributed
        for kind, n in (("single", 1), (multi, args.gpus)):
            out = work / f"B{B}_{kind}"
            ov = BASE + args.extra + [f"train.batch_size={B // n}", f"hydra.run.dir={out}"]
            if n == 1:
                cmd = [sys.executable, "-m", "adarank.run", *ov]
                env = os.environ | {"CUDA_VISIBLE_DEVICES": "0"}
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                       "-m", "adarank.run", *ov, "train.check_masks=true", f"train.distributed={multi}"]
                env = dict(os.environ)
            wall = run(cmd, env, work / f"B{B}_{kind}.log")
            res = json.loads((out / "results.json").read_text())
            res["global_batch"] = B
            results[kind] = res
            entry[kind] = {
                "command": shlex.join(["python"] + cmd[1:]), "wall_seconds": round(wall, 1),
                "steps": res["steps"], "world_size": res["world_size"], "train_seconds": res["train_seconds"],
                "steps_per_second": res["steps_per_second"], "value": res["value"], "best_value": res["best_value"],
                "metric": res["metric"], "loss_curve": [[e["step"], e["train/loss"]] for e in res["train_log"]],
                "final_ranks": res["final_ranks"], "peak_gpu_memory_bytes": res.get("peak_gpu_memory_bytes"),
            }
        entry["comparison"] = compare(results["single"], results[multi])
        entry["comparison"]["max_abs_adapter_weight_diff"] = adapter_diff(work / f"B{B}_single", work / f"B{B}_{multi}")
        report["by_global_batch"][str(B)] = entry
        c = entry["comparison"]
        print(f"B={B}: max |dloss| {c['max_abs_loss_diff']:.2e} (tol {LOSS_TOL}), ranks equal {c['final_ranks_equal']}, "
              f"adapter max diff {c['max_abs_adapter_weight_diff']}, dev {c['dev_value']}, "
              f"steps/s {c['steps_per_second']} -> scaling {c['throughput_scaling']:.2f}x, peak GiB per GPU "
              f"{[round(x / 2**30, 3) for x in (entry['single']['peak_gpu_memory_bytes'] or [])]} -> "
              f"{[round(x / 2**30, 3) for x in (entry[multi]['peak_gpu_memory_bytes'] or [])]}", flush=True)
        atomic_write_json(args.out, report)  # after each batch size, so a kill keeps what finished
    plot(report, png)


if __name__ == "__main__":
    main()
