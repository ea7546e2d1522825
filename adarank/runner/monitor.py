"""Adapter-norm monitor: ‖ΔW‖_F per module, and the seed article's "alpha too high" warning."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ..inject import adapters
from ..layers import LoraLinear, SVDLinear
from ..quant import dense

__all__ = ["adapter_norms", "base_norms", "NormWatch"]


@torch.no_grad()
def adapter_norms(model: nn.Module) -> dict[str, torch.Tensor]:
    """‖ΔW‖_F of every adapter, as 0-d device tensors; one batched matmul per distinct shape."""
    groups: dict[tuple, list[tuple[str, torch.Tensor, torch.Tensor]]] = defaultdict(list)
    for name, m in adapters(model):
        if isinstance(m, SVDLinear):
            if m.r == 0:
                continue
            left, right = m.P * (m.lam * m.scale), m.Q
        elif isinstance(m, LoraLinear):
            left, right = m.lora_B * m.scale, m.lora_A
        else:
            continue
        groups[(tuple(left.shape), tuple(right.shape))].append((name, left, right))
    out: dict[str, torch.Tensor] = {}
    for items in groups.values():
        left = torch.stack([x[1] for x in items]).float()
        right = torch.stack([x[2] for x in items]).float()
        norms = torch.linalg.matrix_norm(left @ right)
        out.update({name: norms[i] for i, (name, _, _) in enumerate(items)})
    for name, m in adapters(model):
        out.setdefault(name, torch.zeros(()))
    return out


@torch.no_grad()
def base_norms(model: nn.Module) -> dict[str, float]:
    """‖W‖_F of the frozen weight under every adapter (read once: it never changes)."""
    return {name: float(dense(m.base.weight).float().norm()) for name, m in adapters(model)}


class NormWatch:
    """Warns once per module and epoch when ‖ΔW‖_F grows more than `factor`× within an epoch.

    The reference is the first norm seen in the epoch, but never less than `floor_frac`·‖W‖_F of the
    frozen weight: adapters start at ΔW = 0 (LoRA's B = 0, AdaLoRA's λ = 0), and growing tenfold from a
    negligible update is learning, not the "alpha too high" blow-up this is meant to catch.
    """

    def __init__(self, factor: float = 10.0, floors: dict[str, float] | None = None, floor_frac: float = 0.01) -> None:
        self.factor = factor
        self.floors = {k: floor_frac * v for k, v in (floors or {}).items()}
        self.epoch = -1
        self.ref: dict[str, float] = {}
        self.warned: set[str] = set()

    def check(self, norms: dict[str, float], epoch: int) -> list[str]:
        if epoch != self.epoch:
            self.epoch, self.ref, self.warned = epoch, {}, set()
        msgs = []
        for name, v in norms.items():
            ref = self.ref.get(name)
            if ref is None:
                ref = max(v, self.floors.get(name, 0.0))
                if ref > 0:
                    self.ref[name] = ref
            elif v > self.factor * ref and name not in self.warned:
                self.warned.add(name)
                msgs.append(
                    f"adapter norm of {name} grew {v / ref:.1f}x within epoch {epoch} ({ref:.3g} -> {v:.3g}): "
                    "alpha/r or the learning rate may be too high"
                )
        return msgs
