"""The two halves of an optimizer step that adarank adds around the optimizer itself.

`before_optimizer` (the orthogonal regulariser's gradient, then clipping) runs on unscaled gradients just
before `optimizer.step()`; `after_optimizer` (the allocator's step and its shrink hand-off) runs just after
it, before the gradients are cleared. The runner's `OptimizerStep` (runner/step.py) and the Trainer callback
(integrations/trainer.py) both call these, so the two train the same way.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .allocation import Allocation, Allocator

__all__ = ["before_optimizer", "after_optimizer"]


def before_optimizer(params: Sequence[torch.Tensor], orth_grad: Callable[[], torch.Tensor] | None,
                     max_grad_norm: float) -> torch.Tensor | None:
    """Add the regulariser's gradient (`orth_grad`, None: no regulariser), then clip `params`' gradient norm to
    `max_grad_norm` (0: no clipping). Returns R (a device scalar) or None."""
    # the regulariser's gradient added explicitly, once per optimizer step (the same as adding it to every
    # micro-batch's loss / grad_accum), and before clipping, so the clipped norm includes it
    r = orth_grad() if orth_grad is not None else None
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    return r


def after_optimizer(allocator: Allocator, optimizer: torch.optim.Optimizer | None,
                    update_importance: bool = True) -> tuple[Allocation, bool]:
    """The allocator's step (`update_importance=False`: the optimizer skipped this step, so its gradients are
    not read), then its shrink hand-off, slicing `optimizer`'s state. Returns (the allocation, whether
    parameters were replaced: the caller re-collects them)."""
    allocation = allocator.step(update_importance=update_importance)
    return allocation, allocator.maybe_shrink(optimizer)
