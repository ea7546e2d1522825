"""The training step as one unit, the same for the runner (`train.py`) and the benchmark (`experiments/bench`).

A step is `micro()` once per micro-batch (forward under autocast, backward of loss / grad_accum), then
`step()` once per optimizer step: unscale, the orthogonal regulariser's gradient, clipping, the optimizer,
the loss scaler, the learning-rate schedule, the allocator (on unscaled gradients, before they are cleared)
and its shrink hand-off; then `zero_grad()`. With a CUDA graph (`use_graphs`) the micro-batches and the
update up to the optimizer replay as graphs; the scaler, the schedule and the allocator run eagerly between
them, as they must (their decisions are made on the host).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import nn

from ..allocation import Allocation, Allocator
from ..fast import graphs as graphs_
from ..update import after_optimizer, before_optimizer

__all__ = ["OptimizerStep", "StepOutcome"]

Forward = Callable[..., Any]  # the module the loop calls (the model, or DDP / compile around it)


@dataclass
class StepOutcome:
    """What one optimizer step did."""

    orth: Optional[torch.Tensor]  # R before its weight (a device scalar), None without a regulariser
    skipped: bool  # the fp16 loss scaler skipped the optimizer (inf/NaN gradients)
    allocation: Optional[Allocation]  # the allocator's step, None for a fixed-rank method
    replaced: bool  # the allocator replaced parameters (a shrink): re-wrap whatever holds the old ones


class OptimizerStep:
    """Holds the optimisation state of a run and performs its steps.

    Args:
        model: the model whose trainable parameters the optimizer holds (re-read after a shrink).
        optimizer, scheduler, scaler: AdamW (or any; None: forward and backward only), an lr scheduler (None:
            constant), a GradScaler (None: off).
        orth_grad: adds the orthogonal regulariser's gradient and returns R; None for no regulariser.
        max_grad_norm: clip the gradient norm to this (0: no clipping).
        allocator: the method's allocator, None for a fixed-rank method.
        grad_accum: micro-batches per optimizer step.
        amp: the autocast dtype, None for plain fp32.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any = None,
                 scaler: torch.amp.GradScaler | None = None, orth_grad: Callable[[], torch.Tensor] | None = None,
                 max_grad_norm: float = 0.0, allocator: Allocator | None = None, grad_accum: int = 1,
                 amp: torch.dtype | None = None) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
        self.orth_grad, self.max_grad_norm, self.allocator = orth_grad, max_grad_norm, allocator
        self.grad_accum, self.amp = grad_accum, amp
        self.params = trainable(model)
        self.graphs: graphs_.GraphedStep | None = None
        self._lr_tensors: list[torch.Tensor] = []
        # averages the gradients of what trains over the ranks before the update (FSDP: fsdp.average_grads);
        # None when something else does (DDP's hooks) or there is one process
        self.sync_grads: Callable[[], None] | None = None

    def use_graphs(self, forward: Forward, device_type: str, max_shapes: int = 8) -> None:
        """Replay micro-batches and the update as CUDA graphs from now on (one GPU, one process; the
        optimizer must be capturable)."""
        # (no optimizer: a frozen model's forward and backward alone, as the benchmark's floor runs it)
        self._lr_tensors = graphs_.bind_lr(self.optimizer) if self.optimizer is not None else []
        amp = self.amp

        def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            # no autocast cast cache: cached casts would outlive the capture that made them
            with torch.autocast(device_type, dtype=amp, enabled=amp is not None, cache_enabled=False):
                return forward(**batch).loss

        self.graphs = graphs_.GraphedStep(loss_of, self.update, self.params, self.grad_accum, max_shapes)

    def micro(self, forward: Forward, batch: dict[str, torch.Tensor],
              no_sync: ContextManager | None = None) -> torch.Tensor:
        """Forward and backward of one micro-batch (on the device); returns the loss (not divided by
        grad_accum). `no_sync`: DDP's context that skips the all-reduce on all but the last micro-batch."""
        if self.graphs is not None:
            return self.graphs.micro(batch)
        device_type = next(iter(batch.values())).device.type
        with no_sync or contextlib.nullcontext():
            with torch.autocast(device_type, dtype=self.amp, enabled=self.amp is not None):
                loss = forward(**batch).loss
            self.scaler.scale(loss / self.grad_accum).backward()
        return loss

    def update(self) -> torch.Tensor | None:
        """Everything between the last backward and the allocator that a CUDA graph can hold: unscale,
        the regulariser's gradient, clipping, the optimizer. Returns R when there is a regulariser."""
        if self.optimizer is None:
            return None
        self.scaler.unscale_(self.optimizer)  # the allocator and clipping see true gradients
        r = before_optimizer(self.params, self.orth_grad, self.max_grad_norm)  # the regulariser, then clipping
        self.scaler.step(self.optimizer)
        return r

    def step(self) -> StepOutcome:
        """One optimizer step after the micro-batches' backward passes."""
        scaler = self.scaler
        scale_before = scaler.get_scale() if scaler.is_enabled() else None
        if self.sync_grads is not None:
            self.sync_grads()
        r = self.graphs.update() if self.graphs is not None else self.update()
        scaler.update()
        skipped = scale_before is not None and scaler.get_scale() < scale_before
        if self.scheduler is not None:
            self.scheduler.step()
            if self.graphs is not None:
                graphs_.sync_lr(self.optimizer, self._lr_tensors)
        allocation, replaced = None, False
        if self.allocator is not None:
            # under DDP the gradients are the ranks' averages here, so every rank computes the same masks
            allocation, replaced = after_optimizer(self.allocator, self.optimizer, update_importance=not skipped)
            if replaced:
                self.params = trainable(self.model)
                if self.graphs is not None:
                    self.graphs.reset(self.params)  # new parameters: new gradient buffers, new graphs
        return StepOutcome(r, skipped, allocation, replaced)

    def zero_grad(self) -> None:
        """Clear the gradients for the next step (in place in graph mode: the buffers are captured)."""
        if self.graphs is not None:
            self.graphs.zero_grads()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    @property
    def lr(self) -> float:
        """The learning rate of the last step (the first param group's)."""
        if self.scheduler is not None:
            return float(self.scheduler.get_last_lr()[0])
        return float(self.optimizer.param_groups[0]["lr"])


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train, in the model's order."""
    return [p for p in model.parameters() if p.requires_grad]
