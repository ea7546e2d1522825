"""`python -m adarank.export_topk RUN_DIR --budget K [K ...] [--eval]`: any budget from one finished adalora run.

The run's final importance scores (adapter/importance.safetensors) order all its kept triplets globally; for
each K this writes the PEFT LoRA adapter of the top-K triplets (adarank.export.truncate_peft), and with
`--eval` scores each truncation on the run's own evaluation splits (the runner's `evaluate`, the base rebuilt
as the run built it) and writes a table and a plot of quality against K. A truncation is evaluated, not a run
trained at budget K.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import os
import sys
from typing import Any, Sequence

from ..atomic import atomic_write_json, atomic_write_text
from ..export import IMPORTANCE_FILE, load_importance, truncate_peft

__all__ = ["main", "export_topk", "evaluate_adapters", "TopkError"]

EXIT_USAGE = 2


class TopkError(ValueError):
    """A bad run folder, budget or output folder: printed as one line."""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m adarank.export_topk", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="a finished adalora run (results.json, adapter/ with importance.safetensors)")
    p.add_argument("--budget", type=int, nargs="+", required=True, metavar="K", help="total ranks to keep")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/topk)")
    p.add_argument("--eval", action="store_true", help="score every truncation on the run's evaluation splits")
    p.add_argument("--force", action="store_true", help="replace adapters already in the output folder")
    p.add_argument("--device", default="auto", help="where --eval computes: auto, cpu, cuda or cuda:N")
    return p.parse_args(list(argv))


def check_run(run_dir: str) -> tuple[dict[str, Any], dict]:
    """(results.json, the importance scores) of a finished run with a saved importance; TopkError otherwise."""
    results_path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(results_path):
        raise TopkError(f"RUN_DIR: {run_dir} holds no results.json (not a finished run)")
    with open(results_path) as f:
        results = json.load(f)
    adapter = os.path.join(run_dir, "adapter")
    if not os.path.isfile(os.path.join(adapter, IMPORTANCE_FILE)):
        raise TopkError(f"RUN_DIR: {adapter} holds no {IMPORTANCE_FILE}; only an adalora run saves its final "
                        f"importance (this one is method={results.get('method')})")
    return results, load_importance(adapter)


def check_budgets(budgets: Sequence[int], total: int) -> list[int]:
    """The distinct budgets, ascending; each in [1, the run's kept triplets]."""
    for k in budgets:
        if not 1 <= k <= total:
            raise TopkError(f"--budget: {k} is outside [1, {total}] (the run kept {total} triplets)")
    return sorted(set(budgets))


def export_topk(run_dir: str, budgets: Sequence[int], out: str | None = None, force: bool = False) -> dict[int, dict]:
    """Write OUT/budget_K/ (a PEFT LoRA adapter) for every K; returns {K: its rank per module}. Nothing is
    written when a budget is out of range or, without `force`, an adapter folder exists already."""
    _, scores = check_run(run_dir)
    total = sum(s.numel() for s in scores.values())
    budgets = check_budgets(budgets, total)
    out = out or os.path.join(run_dir, "topk")
    dirs = {k: os.path.join(out, f"budget_{k}") for k in budgets}
    taken = [d for d in dirs.values() if os.path.exists(d)]
    if taken and not force:
        raise TopkError(f"--out: {taken[0]} exists already; pass --force to replace it")
    adapter = os.path.join(run_dir, "adapter")
    return {k: truncate_peft(adapter, d, k, scores) for k, d in dirs.items()}


def check_device(device: str) -> str:
    """`device` if this machine has it; TopkError naming --device otherwise."""
    from .config import TrainConfig
    from .train import pick_device

    try:
        pick_device(TrainConfig(device=device).device)
    except ValueError as e:
        raise TopkError("--device" + str(e).removeprefix("train.device")) from None
    return device


def evaluate_adapters(run_dir: str, adapters: dict[int, str], device: str = "auto") -> dict[int, dict[str, float]]:
    """Each adapter folder's metrics on the run's evaluation splits, the base rebuilt as the run built it, on
    `device` (not the run's: a GPU run can be scored on a CPU)."""
    import dataclasses

    from omegaconf import OmegaConf
    from peft import PeftModel

    from .cli import to_config
    from .config import Config
    from .evaluation import evaluate
    from .train import load_base, prepare_data, setup_env

    with open(os.path.join(run_dir, "results.json")) as f:
        saved = json.load(f)["config"]
    cfg = to_config(OmegaConf.merge(OmegaConf.structured(Config), saved))
    if cfg.model.quantization != "none":
        raise TopkError("--eval: the run's base is quantised (model.quantization); PEFT loads these adapters on a "
                        "dense base only")
    cfg.train = dataclasses.replace(cfg.train, device=check_device(device), cuda_graph=False)  # scoring needs no graphs
    env = setup_env(cfg.train, lambda *a, **k: None)
    data = prepare_data(cfg, env)
    base = load_base(cfg, data, env)
    out: dict[int, dict[str, float]] = {}
    for k, path in adapters.items():
        model = PeftModel.from_pretrained(copy.deepcopy(base), path).to(env.device).eval()
        res: dict[str, float] = {}
        for name, batches in data.eval_sets.items():
            res.update(evaluate(model, batches, data.task, env.device, env.amp, prefix=f"{name}/"))
        out[k] = res
    return out


def write_table(out: str, rows: list[dict[str, Any]], metric: str, final_budget: int, title: str) -> None:
    """OUT/topk.json, OUT/topk.csv and OUT/topk.png (the metric against K, the run's own budget marked)."""
    from .plots import new_figure, save_png

    atomic_write_json(os.path.join(out, "topk.json"), rows)
    keys = sorted({k for r in rows for k in r["metrics"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["budget", "truncated", *keys])
    for r in rows:
        w.writerow([r["budget"], r["truncated"], *(r["metrics"].get(k, "") for k in keys)])
    atomic_write_text(os.path.join(out, "topk.csv"), buf.getvalue())
    fig = new_figure(6, 3.5)
    ax = fig.add_subplot()
    ax.plot([r["budget"] for r in rows], [r["metrics"][metric] for r in rows], marker="o")
    ax.axvline(final_budget, color="grey", ls="--", lw=1, label=f"trained budget ({final_budget})")
    ax.set_xlabel("K (total rank kept, top-K by final importance)")
    ax.set_ylabel(metric)
    ax.set_title(f"{title}: truncations of one run, not runs trained at K", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, os.path.join(out, "topk.png"))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Export, and with --eval score and tabulate; returns the table's rows (empty without --eval)."""
    results, scores = check_run(args.run_dir)
    if args.eval:
        check_device(args.device)  # before anything is written
    out = args.out or os.path.join(args.run_dir, "topk")
    ranks = export_topk(args.run_dir, args.budget, out, args.force)
    for k, r in ranks.items():
        print(f"K={k}: {os.path.join(out, f'budget_{k}')} ({sum(1 for v in r.values() if v)} of {len(r)} modules)")
    if not args.eval:
        return []
    total = sum(s.numel() for s in scores.values())
    # the untruncated adapter too: the run itself, at the budget it trained at
    folders = {k: os.path.join(out, f"budget_{k}") for k in ranks} | {total: os.path.join(args.run_dir, "adapter")}
    metrics = evaluate_adapters(args.run_dir, folders, args.device)
    rows = [{"budget": k, "truncated": k < total, "ranks": ranks.get(k), "metrics": metrics[k]} for k in sorted(metrics)]
    from .data import get_task

    task = results["config"]["task"]["name"]
    metric = f"{get_task(task).dev_splits[0]}/{results['metric']}"  # the split results.json's value is from
    write_table(out, rows, metric, total, f"{results['method']} {task}")
    for r in rows:
        print(f"K={r['budget']}{'' if r['truncated'] else ' (trained)'}: {metric} = {r['metrics'][metric]:.4f}")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except (TopkError, ValueError, OSError) as e:
        print(f"adarank.export_topk: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0
