"""Adapter-norm monitor: ‖ΔW‖_F per module, and the seed article's "alpha too high" warning."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .inject import adapters
from .layers import LoraLinear, SVDLinear

__all__ = ["adapter_norms", "NormWatch"]


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


class NormWatch:
    """Warns once per module and epoch when ‖ΔW‖_F grows more than `factor`× within an epoch.

    The reference is the first nonzero norm seen in the epoch (LoRA starts at ΔW = 0).
    """

    def __init__(self, factor: float = 10.0) -> None:
        self.factor = factor
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
                if v > 0:
                    self.ref[name] = v
            elif v > self.factor * ref and name not in self.warned:
                self.warned.add(name)
                msgs.append(
                    f"adapter norm of {name} grew {v / ref:.1f}x within epoch {epoch} ({ref:.3g} -> {v:.3g}): "
                    "alpha/r or the learning rate may be too high"
                )
        return msgs
