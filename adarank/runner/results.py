"""The end of a run: the final evaluation, plots, what it trained, and `results.json` (written atomically)."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..allocation import Allocation
from ..atomic import atomic_write_json
from . import checkpoint as ckpt
from . import distributed as dist_
from . import events
from .config import Config
from .evaluation import Evaluator
from .methods import Adapted
from .plots import budget_curve, rank_heatmap
from .provenance import code_sha256, git_sha, versions
from .state import LoopState
from .tracking import Tracker

if TYPE_CHECKING:
    from .train import Env

__all__ = ["finish_run", "load_finished"]


def load_finished(out_dir: str) -> dict[str, Any]:
    """The results.json of a run that already finished."""
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


def finish_run(cfg: Config, out_dir: str, model: nn.Module, adapted: Adapted, allocation: Allocation | None,
               loop: LoopState, evaluator: Evaluator, tracker: Tracker, env: "Env", *, t_start: float,
               step_seconds: float, timed_from: int, shapes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate at the last step (unless that was just done), plot, save what trained and results.json
    (rank 0), close the tracker and remove the checkpoint; returns the results. `shapes`: entries added to
    results.json (shapes.shape_record)."""
    history, step = loop.history, loop.step
    final = history["evals"][-1] if history["evals"] and history["evals"][-1]["step"] == step else evaluator.run(step, history)
    ranks = allocation.rank_dict() if allocation is not None else {}
    _plots(cfg, out_dir, ranks, history["budget_curve"], tracker, step)
    results = _results(cfg, evaluator.task, model, adapted, final, history, ranks, env, step, t_start, step_seconds,
                       timed_from)
    results.update(shapes or {})  # "compile" and "cuda_graph": what was compiled or captured (shapes.py)
    dist = env.dist
    if dist.is_main:
        if adapted.save is not None:
            adapted.save(out_dir)
        atomic_write_json(os.path.join(out_dir, "results.json"), results)
    best = history["best"]
    tracker.summary({"final/" + k: v for k, v in final.items()} | {"best/" + k: v for k, v in best.items()})
    tracker.finish()
    dist_.barrier(dist)
    if dist.is_main:
        ckpt.remove(out_dir)  # the run finished: results.json is the record, the checkpoints are obsolete
    return results


def _plots(cfg: Config, out_dir: str, ranks: dict[str, int], curve: list, tracker: Tracker, step: int) -> None:
    """The rank heatmap and the budget curve, into the output dir and the tracker."""
    title = f"{cfg.method.name} {cfg.task.name}"
    if ranks:
        path = rank_heatmap(ranks, os.path.join(out_dir, "rank_heatmap.png"), title=title)
        tracker.log_ranks(ranks, step)
        if path:
            tracker.log_image("rank_heatmap", path, step)
    if curve:
        bpath = budget_curve(curve, os.path.join(out_dir, "budget_curve.png"), title=title)
        if bpath:
            tracker.log_image("budget_curve", bpath, step)


def _results(cfg: Config, task, model: nn.Module, adapted: Adapted, final: dict, history: dict, ranks: dict[str, int],
             env: "Env", step: int, t_start: float, step_seconds: float, timed_from: int) -> dict[str, Any]:
    device = env.device
    main_key = f"{task.dev_splits[0]}/{task.main_metric}"
    best = history["best"]
    m = cfg.method
    return {
        "experiment": cfg.experiment_name, "task": cfg.task.name, "method": m.name, "model": cfg.model.name,
        # the final average rank: method.r, or what a total-rank / parameter target resolved to
        "budget": adapted.final_rank, "seed": cfg.seed, "metric": task.main_metric,
        "value": final[main_key], "best_value": best[main_key],
        "metrics": {"final": final, "best": best, "best_step": best["step"]},
        # what applied: the peak learning rate (method.lr over train.lr) and α (none for full fine-tuning)
        "lr": m.lr if m.lr is not None else cfg.train.lr, "alpha": m.alpha if adapted.final_rank is not None else None,
        "trainable_params": adapted.report.trainable, "trainable_share": adapted.report.share,
        # after a shrink (or rank-0 pruning) the adapters are smaller than at the start
        "trainable_params_final": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": step, "seconds": round(time.time() - t_start, 2),
        # this process's training steps after its first (no evaluation, no checkpoints): the throughput
        "train_seconds": round(step_seconds, 3),
        "steps_per_second": round((step - timed_from) / step_seconds, 3) if step_seconds > 0 else None,
        "world_size": env.dist.world_size,
        # each rank's peak of allocated GPU memory (train.distributed=fsdp shards the frozen base: it falls)
        "peak_gpu_memory_bytes": (dist_.gather_objects(env.dist, torch.cuda.max_memory_allocated(device))
                                  if device.type == "cuda" else None),
        "final_ranks": ranks, "budget_curve": history["budget_curve"],
        **events.results_fields(history),  # the ranks at each masking event, the final mask's kept triplets
        "evals": history["evals"], "train_log": history["log"],
        "config": asdict(cfg), "git_sha": git_sha(), "code_sha256": code_sha256(), "versions": versions(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
    }

