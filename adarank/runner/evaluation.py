"""Evaluation: score every held-out split, record it, and keep the best step by the validation metric."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .data import Batches, compute_metrics

__all__ = ["Evaluator", "evaluate"]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, task, device: torch.device, amp: torch.dtype | None, prefix: str) -> dict[str, float]:
    """The task's metrics on one split (perplexity for a causal task), keys prefixed with `prefix`."""
    if task.is_causal:  # held-out perplexity, token-weighted
        from .data.causal import perplexity

        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            res = perplexity(model, batches, device)
        return {f"{prefix}ppl": res["ppl"], f"{prefix}nll": res["nll"]}
    model.eval()
    preds, labels = [], []
    for batch in batches:
        labels.append(batch.pop("labels"))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = model(**batch).logits
        preds.append(logits.float().cpu())
    model.train()
    return compute_metrics(task, torch.cat(preds).numpy(), torch.cat(labels).numpy(), prefix=prefix)


class Evaluator:
    """Scores the run's evaluation splits with the plain model (no DDP hooks): every rank scores the full
    sets, so all ranks agree on the best step without a collective; only rank 0's tracker logs."""

    def __init__(self, model: nn.Module, eval_sets: dict[str, Batches], task, device: torch.device,
                 amp: torch.dtype | None, tracker) -> None:
        self.model, self.eval_sets, self.task, self.device, self.amp, self.tracker = model, eval_sets, task, device, amp, tracker
        self.val_key = f"val/{task.main_metric}"

    def run(self, step: int, history: dict[str, Any]) -> dict[str, float]:
        """Evaluate at `step`; appends to history["evals"] and updates history["best"]."""
        res: dict[str, float] = {}
        for name, batches in self.eval_sets.items():
            res.update(evaluate(self.model, batches, self.task, self.device, self.amp, prefix=f"{name}/"))
        history["evals"].append({"step": step, **res})
        best = history["best"]
        if best is None or self._better(res[self.val_key], best[self.val_key]):
            history["best"] = {"step": step, **res}
        self.tracker.log({f"eval/{k}": v for k, v in res.items()}, step)
        return res

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.task.higher_is_better else a < b
