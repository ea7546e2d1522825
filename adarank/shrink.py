"""Shrink: physically remove pruned triplets from SVD adapters and slice the optimizer state to match.

PEFT only masks, so its adapters never get smaller or cheaper. The scale stays α/r_init, so the
function computed by the kept triplets is unchanged.

One training difference remains, by design: after a shrink the orthogonal regulariser sees only the kept
columns of P (rows of Q), while a masked adapter (PEFT, or `shrink=false`) keeps regularising the pruned
ones against the kept ones too. With orth_weight = 0 the two trajectories are identical (tested).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .layers import SVDLinear

__all__ = ["shrink_layers", "remap_optimizer"]

Swap = tuple[nn.Parameter, nn.Parameter, int, torch.Tensor]


def shrink_layers(layers: Sequence[SVDLinear], masks: Sequence[torch.Tensor]) -> list[Swap]:
    """Keep the triplets where `mask` is True in each layer; returns the parameter swaps."""
    swaps: list[Swap] = []
    for layer, mask in zip(layers, masks):
        swaps += layer.keep(mask.nonzero().flatten())
    return swaps


@torch.no_grad()
def remap_optimizer(optimizer: torch.optim.Optimizer, swaps: Sequence[Swap]) -> None:
    """Point the optimizer at the new parameters and slice each per-element state tensor."""
    by_old = {id(old): (new, dim, idx) for old, new, dim, idx in swaps}
    for group in optimizer.param_groups:
        kept = []
        for p in group["params"]:
            hit = by_old.get(id(p))
            if hit is None:
                kept.append(p)
                continue
            new, dim, idx = hit
            state = optimizer.state.pop(p, None)
            if not new.requires_grad:  # pruned to rank 0: nothing left to optimise
                continue
            kept.append(new)
            if state is not None:
                optimizer.state[new] = {
                    k: v.index_select(dim, idx.to(v.device)).clone()
                    if torch.is_tensor(v) and v.shape == p.shape
                    else v
                    for k, v in state.items()
                }
        group["params"] = kept
