"""The allocator contract: what the training loop (and the Trainer callback) may call, and what a step returns.

Any allocation method is one class with these members; the loop calls nothing else. `RankAllocator`
(AdaLoRA's, in `allocator.py`), `IncreLoraAllocator` (`increlora.py`) and the PEFT baseline's wrapper
(`runner/peft_baselines.py`) satisfy it.
Like torchtune's `AdapterModule`, this is a structural `typing.Protocol`: no base class to inherit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

__all__ = ["Allocation", "Allocator", "segment_sums"]


@dataclass
class Allocation:
    """What one allocator step did. Tensors live on the adapters' device; call `.tolist()` to log."""

    step: int
    budget: int
    phase: str  # "init", "budget" or "final"
    masked: bool  # whether a new mask was computed at this step
    threshold: torch.Tensor | None  # 0-d tensor, None when nothing needed pruning
    mask: torch.Tensor  # the kept-triplet mask after this step (flat, module order); never mutated
    bounds: tuple[torch.Tensor, torch.Tensor]  # (starts, ends) of each module in `mask`
    names: list[str]

    @property
    def ranks(self) -> torch.Tensor:
        """(n_modules,) kept triplets per module, in `names` order (computed on demand)."""
        return segment_sums(self.mask, *self.bounds)

    def rank_dict(self) -> dict[str, int]:
        """{module name: rank}; syncs with the device."""
        return dict(zip(self.names, self.ranks.tolist()))

    @classmethod
    def from_mask(cls, step: int, budget: int, mask: torch.Tensor, sizes: Sequence[int], names: list[str],
                  phase: str = "budget", masked: bool = True, threshold: torch.Tensor | None = None) -> "Allocation":
        """An allocation from a flat kept-triplet mask and each module's number of triplets in it."""
        ends = torch.tensor(list(sizes), dtype=torch.long, device=mask.device).cumsum(0)
        starts = ends - torch.tensor(list(sizes), dtype=torch.long, device=mask.device)
        return cls(step, budget, phase, masked, threshold, mask, (starts, ends), names)


def segment_sums(mask: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Per-segment counts of True in a flat mask, one cumsum for all segments."""
    cs = torch.cat([mask.new_zeros(1, dtype=torch.long), mask.long().cumsum(0)])
    return cs[ends] - cs[starts]


@runtime_checkable
class Allocator(Protocol):
    """Decides, after every optimizer step, how much rank each adapted module keeps.

    The loop's calls, in order, once per optimizer step (after the optimizer, on unscaled gradients,
    before the gradients are cleared): `allocation = step(update_importance=...)`, then
    `maybe_shrink(optimizer)`. A checkpoint stores `state_dict()`; a resumed run calls
    `load_state_dict()` before it builds its optimizer.
    """

    #: the adapted modules, in the order of `Allocation.names` and of the rank vectors
    names: list[str]

    def step(self, update_importance: bool = True) -> Allocation:
        """Advance one optimizer step. `update_importance=False`: the optimizer skipped this step (fp16
        overflow), so its gradients must not be read; the schedule still advances."""
        ...

    def maybe_shrink(self, optimizer: torch.optim.Optimizer | None) -> bool:
        """The parameter hand-off: replace parameters (slicing `optimizer`'s state to match after a shrink,
        zero-padding it after a growth, as IncreLoRA's) if this allocator wants to now; True when it did, so
        the loop re-collects its parameters."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue the schedule exactly."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; may replace parameters (a shrunk state), so call it before building the
        optimizer."""
        ...
