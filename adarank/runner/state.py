"""The loop's state: where a run is, what it has recorded, and the running sums of what it logs next.

One dataclass, and exactly what a checkpoint stores next to the weights, the optimizer, the schedule, the
allocator and the RNG (`to_checkpoint` / `from_checkpoint`; the checkpoint's keys are unchanged from the
flat dict earlier versions wrote, so their checkpoints still resume).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..allocation import Allocation

__all__ = ["LoopState", "new_history"]


def new_history() -> dict[str, Any]:
    """What results.json reports of a run's course: the budget curve, every evaluation, the logged scalars,
    the best evaluation (by the validation metric) and the W&B run id."""
    return {"budget_curve": [], "evals": [], "log": [], "best": None, "wandb_id": None}


@dataclass
class LoopState:
    """Where the loop is (optimizer steps done, epoch, batches into it) and what it accumulated."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    history: dict[str, Any] = field(default_factory=new_history)
    # the loss and R of the steps since the last log (device scalars: adding to them does not sync)
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    loss_n: int = 0
    orth_sum: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    orth_n: int = 0

    @classmethod
    def start(cls, device: torch.device) -> "LoopState":
        """A fresh run's state, with the running sums on `device`."""
        return cls(loss_sum=torch.tensor(0.0, device=device), orth_sum=torch.tensor(0.0, device=device))

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], device: torch.device) -> "LoopState":
        """The state a checkpoint holds (the loss and R logged next average over the same steps as in an
        uninterrupted run; torch.tensor(float) restores a float32 sum exactly)."""
        history = state["history"]
        history.setdefault("log", [])  # checkpoints written before the log existed
        return cls(state["step"], state["epoch"], state["batch_in_epoch"], history,
                   torch.tensor(state.get("loss_sum", 0.0), device=device), state.get("loss_n", 0),
                   torch.tensor(state.get("orth_sum", 0.0), device=device), state.get("orth_n", 0))

    def to_checkpoint(self) -> dict[str, Any]:
        """The checkpoint's entries for this state (plain numbers: they load on any device)."""
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "history": self.history,
                "loss_sum": self.loss_sum.item(), "loss_n": self.loss_n, "orth_sum": self.orth_sum.item(), "orth_n": self.orth_n}

    def add_loss(self, loss: torch.Tensor) -> None:
        """One micro-batch's loss."""
        self.loss_sum += loss.detach().float()
        self.loss_n += 1

    def add_step(self, orth: torch.Tensor | None, allocation: Allocation | None) -> None:
        """One optimizer step done: count it, add its R, record its budget."""
        self.step += 1
        if orth is not None:
            self.orth_sum += orth.to(self.orth_sum.device)
            self.orth_n += 1
        if allocation is not None:
            self.history["budget_curve"].append([self.step, allocation.budget])
