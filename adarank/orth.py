"""Orthogonal regulariser R(P, Q) on the SVD adapters, batched over matrices of one shape.

The training loop adds it to the loss explicitly; nothing is hidden in a forward.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from .layers import SVDLinear

__all__ = ["orth_penalty", "ORTH_FORMS"]

#: "mean_norm": mean over all P and Q of ‖PᵀP − I‖_F, as PEFT and the official code compute it (the
#: published orth_reg_weight values assume this form). "sum_sq": the paper's Σ ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F.
ORTH_FORMS = ("mean_norm", "sum_sq")


def _gram_residual(mats: list[torch.Tensor], left: bool) -> torch.Tensor:
    """‖MᵀM − I‖_F (left=True, M is (out, r)) or ‖MMᵀ − I‖_F (M is (r, in)) for each stacked M."""
    m = torch.stack(mats)
    g = m.transpose(1, 2) @ m if left else m @ m.transpose(1, 2)
    eye = torch.eye(g.shape[-1], device=g.device, dtype=g.dtype)
    # matrix_norm has a safe subgradient at 0, unlike sqrt(sum of squares)
    return torch.linalg.matrix_norm(g - eye)


def orth_penalty(layers: Sequence[SVDLinear], form: str = "mean_norm") -> torch.Tensor:
    """R over all SVD adapters: one stack + batched matmul per distinct matrix shape, never per layer."""
    if form not in ORTH_FORMS:
        raise ValueError(f"method.orth_form: must be one of {ORTH_FORMS}, got {form!r}")
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for layer in layers:
        if layer.r == 0:
            continue
        groups[("P",) + tuple(layer.P.shape)].append(layer.P)
        groups[("Q",) + tuple(layer.Q.shape)].append(layer.Q)
    if not groups:
        return torch.zeros(())
    norms = torch.cat([_gram_residual(mats, left=key[0] == "P") for key, mats in groups.items()])
    if form == "sum_sq":
        return norms.square().sum()
    return norms.sum() / (2 * len(layers))
