"""Orthogonal regulariser R(P, Q) on the SVD adapters, batched over matrices of one shape.

The training loop adds it to the loss explicitly; nothing is hidden in a forward.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from .layers import SVDLinear

__all__ = ["orth_penalty", "orth_grad_", "ORTH_FORMS"]

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


def _shape_groups(layers: Sequence[SVDLinear], form: str) -> dict[tuple, list[torch.nn.Parameter]]:
    """P and Q of every live adapter, grouped by role and shape (rank-0 adapters have nothing to keep
    orthogonal)."""
    if form not in ORTH_FORMS:
        raise ValueError(f"method.orth_form: must be one of {ORTH_FORMS}, got {form!r}")
    groups: dict[tuple, list[torch.nn.Parameter]] = defaultdict(list)
    for layer in layers:
        if layer.r == 0:
            continue
        groups[("P",) + tuple(layer.P.shape)].append(layer.P)
        groups[("Q",) + tuple(layer.Q.shape)].append(layer.Q)
    return groups


def orth_penalty(layers: Sequence[SVDLinear], form: str = "mean_norm") -> torch.Tensor:
    """R over all SVD adapters: one stack + batched matmul per distinct matrix shape, never per layer."""
    groups = _shape_groups(layers, form)
    if not groups:
        return torch.zeros(())
    # fp32 even under autocast: the Gram diagonal sits near 1, where bf16 resolves only ~0.4%
    dev = next(iter(groups.values()))[0].device.type
    with torch.autocast(dev, enabled=False):
        norms = torch.cat([_gram_residual([x.float() for x in mats], left=key[0] == "P") for key, mats in groups.items()])
    if form == "sum_sq":
        return norms.square().sum()
    return norms.sum() / (2 * len(layers))


@torch.no_grad()
def orth_grad_(layers: Sequence[SVDLinear], weight: float, form: str = "mean_norm") -> torch.Tensor:
    """Add weight·∇R to every P.grad and Q.grad in place and return R (detached, unweighted).

    The same gradient as backpropagating `weight * orth_penalty(layers, form)`, computed in closed form
    per shape group (∇‖MᵀM − I‖²_F = 4·M(MᵀM − I)), so the regulariser costs a few batched kernels plus
    one multi-tensor add instead of an autograd graph with a node per matrix. Call it once per optimizer
    step, after gradients are unscaled and before clipping.
    """
    groups = _shape_groups(layers, form)
    if not groups:
        return torch.zeros(())
    n_mats = 2 * len(layers)
    params: list[torch.nn.Parameter] = []
    grads: list[torch.Tensor] = []
    norms = []
    for key, mats in groups.items():
        m = torch.stack([p.detach() for p in mats]).float()
        left = key[0] == "P"
        e = m.transpose(1, 2) @ m if left else m @ m.transpose(1, 2)
        e.diagonal(dim1=1, dim2=2).sub_(1.0)
        n = torch.linalg.matrix_norm(e)
        norms.append(n)
        g = m @ e if left else e @ m  # ∇‖E‖²_F / 4
        if form == "sum_sq":
            g.mul_(4.0 * weight)
        else:  # ∇ (‖E‖_F / n_mats) = 2·g / (‖E‖_F · n_mats); zero where E = 0
            coef = torch.where(n > 0, 2.0 * weight / (n * n_mats), torch.zeros_like(n))
            g.mul_(coef[:, None, None])
        params += mats
        grads += list(g.to(mats[0].dtype).unbind(0))
    have = [(p.grad, g) for p, g in zip(params, grads) if p.grad is not None]
    if have:
        torch._foreach_add_([x for x, _ in have], [g for _, g in have])
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.clone()
    n = torch.cat(norms)
    return n.square().sum() if form == "sum_sq" else n.sum() / n_mats
