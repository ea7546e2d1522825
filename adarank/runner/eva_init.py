"""method=eva in the runner: which batches the SVD sees, where it runs, and the LoRA adapters it sets up.

Before training (`Adapted.init_from_data`, called by `train.prepare_model` before the model is moved or the
optimizer built), the first `method.eva.n_batches` batches of epoch 0's order over the whole train split
(independent of the number of processes; `method.eva.batch_size` examples each) run through the frozen
model, and `adarank.eva.eva` turns the targets' inputs into a rank and an A per module. LoRA is then
injected at those ranks (a module at rank 0 stays unadapted), A copied in, B = 0, and each module's α is
α·r_i/r (`adjust_scaling_factors`, as PEFT) or α. From there it trains, exports and fuses as LoRA with a rank
pattern.

Under DDP rank 0 computes the init and broadcasts it (ranks and A): every rank starts from the same adapters
by construction, with no collective inside the forward hooks (PEFT gathers every layer input from every rank
instead). The pattern is the state of `FixedRanks`, the method's allocator: it goes into every checkpoint,
so a resumed run rebuilds its adapters from the checkpoint's ranks (their weights, A included, come from
the checkpoint) and never runs the SVD again; every step reports it, so results.json's `final_ranks`, the
rank heatmap and the budget curve read as for adalora.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch import nn

from ..allocation import Allocation
from ..eva import EvaNotConverged, EvaResult, eva
from ..inject import adapters, param_report
from . import distributed as dist_

if TYPE_CHECKING:
    from .config import EvaConfig
    from .methods import Adapted

__all__ = ["InitData", "FixedRanks", "eva_batches", "initializer"]


@dataclass
class InitData:
    """What a method that initialises from data gets before training."""

    train: Any  #: the run's training batches (a `Batches`; this rank's share under DDP)
    device: torch.device
    dist: dist_.DistInfo
    #: the checkpoint being resumed, or None for a fresh run
    saved: Optional[dict[str, Any]] = None
    log: Callable[..., None] = print


def eva_batches(train, n_batches: int, batch_size: int | None) -> list[dict[str, torch.Tensor]]:
    """The first `n_batches` batches of epoch 0's order over the whole train split (as one process sees it)."""
    loader = copy.copy(train)  # the run's loader is left as it was
    loader.batch_size = batch_size or train.batch_size
    loader.rank, loader.world_size, loader.pin_memory = 0, 1, False
    loader.set_epoch(0, 0)
    return list(itertools.islice(iter(loader), n_batches))


class FixedRanks:
    """The allocator of an init-time allocation: the ranks never change after the init. Every step reports
    them; the state is the pattern (and what the init recorded), so a checkpoint carries it."""

    def __init__(self, ranks: dict[str, int], record: dict[str, Any], device: torch.device) -> None:
        self.names = list(ranks)
        self.ranks, self.record, self._step = dict(ranks), dict(record), 0
        sizes = list(ranks.values())
        self._mask = torch.ones(sum(sizes), dtype=torch.bool, device=device)
        self._sizes = sizes

    def step(self, update_importance: bool = True) -> Allocation:
        self._step += 1
        return Allocation.from_mask(self._step, int(self._mask.numel()), self._mask, self._sizes, self.names,
                                    phase="final", masked=False)

    def maybe_shrink(self, optimizer: torch.optim.Optimizer | None) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step, "ranks": dict(self.ranks), "record": dict(self.record)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if dict(state["ranks"]) != self.ranks:
            raise ValueError("checkpoint: its rank pattern differs from the adapters this run built")
        self._step = int(state["step"])


def initializer(adapted: "Adapted", inject_lora: Callable[[dict[str, int]], Any], r: int, alpha: float,
                rslora: bool, eva_cfg: "EvaConfig") -> Callable[[InitData], None]:
    """`Adapted.init_from_data` of method=eva: computes (or, resuming, reads) the ranks and A, injects LoRA
    with `inject_lora(ranks)` and completes `adapted` (report, final rank, allocator)."""
    e = eva_cfg

    def init(data: InitData) -> None:
        model, names = adapted.model, adapted.targets
        if data.saved is not None:  # resuming: the pattern is in the checkpoint, the weights follow it
            state = data.saved["allocator"]
            ranks, init_a, record = dict(state["ranks"]), None, dict(state["record"])
        else:
            result, n_batches = dist_.from_main(data.dist, lambda: _compute(model, names, data, r, e))
            ranks, init_a = result.ranks, result.init
            record = {"forwards": result.forwards, "shared": result.shared, "n_batches": n_batches}
            zero = [n for n, k in ranks.items() if k == 0]
            data.log(f"eva: {result.forwards} forward passes over {n_batches} batch{'es' if n_batches != 1 else ''}; total rank "
                     f"{sum(ranks.values())} over {len(names)} modules, {len(zero)} left unadapted")
        inject_lora(ranks)
        _set_adapters(model, ranks, init_a, r, alpha, rslora, e.adjust_scaling_factors)
        adapted.report = param_report(model)
        avg = sum(ranks.values()) / len(names)
        adapted.final_rank = int(avg) if avg == int(avg) else round(avg, 3)
        adapted.make_allocator = lambda schedule: FixedRanks(ranks, record, _device(model, data.device))

    return init


def _compute(model: nn.Module, names: list[str], data: InitData, r: int, e: "EvaConfig") -> tuple[EvaResult, int]:
    """The init on this process's device, and how many batches it cycled (fewer than n_batches on a small split)."""
    model.to(data.device)
    batches = eva_batches(data.train, e.n_batches, e.batch_size)
    try:
        return eva(model, names, batches, r, e.rho, e.tau, e.whiten, e.use_label_mask,
                   max_forwards=e.max_passes * len(batches)), len(batches)
    except EvaNotConverged as err:
        msg = str(err).removeprefix("eva: ")
        if "fewer rows" in msg:
            raise ValueError(f"method.eva.batch_size: {msg} (method.eva.batch_size, method.r or method.eva.rho)") from None
        raise ValueError(f"method.eva.max_passes: {msg}; raise method.eva.max_passes or method.eva.n_batches, "
                         "or lower method.eva.tau") from None


@torch.no_grad()
def _set_adapters(model: nn.Module, ranks: dict[str, int], init_a: dict[str, torch.Tensor] | None, r: int,
                  alpha: float, rslora: bool, adjust: bool) -> None:
    """A = the init's rows (kept as initialised when resuming: the checkpoint overwrites it), and α per module."""
    for name, layer in adapters(model):
        rank = ranks[name]
        layer.alpha = alpha * rank / r if adjust else alpha
        layer.scale = layer.alpha / math.sqrt(rank) if rslora else layer.alpha / rank
        if init_a is not None:
            layer.lora_A.copy_(init_a[name].to(layer.lora_A.device, layer.lora_A.dtype))


def _device(model: nn.Module, fallback: torch.device) -> torch.device:
    """Where the adapters are (the allocator's mask lives there)."""
    layers = adapters(model)
    return layers[0][1].lora_A.device if layers else fallback
