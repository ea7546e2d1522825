"""Grow: append triplets to SVD adapters and pad the optimizer state to match (the inverse of `shrink`).

A new triplet starts as IncreLoRA's do when they are added without advance learning: a column of P and a
row of Q drawn from N(0, 0.02), λ = 0. With λ = 0 the layer computes exactly what it computed before, and
the scale stays α/r_init, so growing never changes the function. AdamW's moments of the new entries start
at zero; the step count is the parameter's, shared with its old entries.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .layers import SVDLinear

__all__ = ["grow_layer", "grow_layers", "pad_optimizer"]

#: (old parameter, new parameter, the dimension that grew, entries appended along it)
Growth = tuple[nn.Parameter, nn.Parameter, int, int]

INIT_STD = 0.02  # the std of P and Q at injection (SVDLinear), as in the reference


@torch.no_grad()
def grow_layer(layer: SVDLinear, k: int, generator: torch.Generator | None = None) -> list[Growth]:
    """Append `k` triplets to `layer` (new parameters replace P, λ, Q); returns what grew, for the optimizer.

    The new columns and rows are drawn on the CPU from `generator`, so every process of a run (and a resumed
    run) draws the same ones whatever the device.
    """
    if k < 1:
        return []
    out = []
    for name, dim in (("P", 1), ("lam", 0), ("Q", 0)):
        old = getattr(layer, name)
        shape = list(old.shape)
        shape[dim] = k
        if name == "lam":
            extra = torch.zeros(shape, dtype=old.dtype)
        else:
            extra = torch.randn(shape, generator=generator, dtype=torch.float32).mul_(INIT_STD).to(old.dtype)
        new = nn.Parameter(torch.cat([old.detach(), extra.to(old.device)], dim), requires_grad=True)
        setattr(layer, name, new)  # the same key of _parameters: the model's parameter order is kept
        out.append((old, new, dim, k))
    return out


def grow_layers(layers: Sequence[SVDLinear], counts: Sequence[int], seed: int) -> list[Growth]:
    """Grow each layer by its count (0: untouched), drawing from one generator seeded by `seed`, in order."""
    gen = torch.Generator().manual_seed(seed)
    growths: list[Growth] = []
    for layer, k in zip(layers, counts):
        growths += grow_layer(layer, k, gen)
    return growths


@torch.no_grad()
def pad_optimizer(optimizer: torch.optim.Optimizer, growths: Sequence[Growth]) -> None:
    """Point the optimizer at the grown parameters, in the old ones' places; zero-pad each per-element state
    tensor (AdamW's exp_avg, exp_avg_sq) along the grown dimension; keep the rest (the step count)."""
    by_old = {id(old): (new, dim, k) for old, new, dim, k in growths}
    for group in optimizer.param_groups:
        params = group["params"]
        for i, p in enumerate(params):
            hit = by_old.get(id(p))
            if hit is None:
                continue
            new, dim, k = hit
            params[i] = new
            state = optimizer.state.pop(p, None)
            if state is None:
                continue
            optimizer.state[new] = {key: _pad(v, dim, k) if torch.is_tensor(v) and v.shape == p.shape else v
                                    for key, v in state.items()}


def _pad(v: torch.Tensor, dim: int, k: int) -> torch.Tensor:
    shape = list(v.shape)
    shape[dim] = k
    return torch.cat([v, v.new_zeros(shape)], dim)
