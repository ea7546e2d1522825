"""Orthogonal regulariser R(P, Q) on the SVD adapters, batched over matrices of one shape.

The training loop adds it to the loss explicitly; nothing is hidden in a forward.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from .layers import SVDLinear

__all__ = ["orth_penalty", "orth_grad_", "OrthGrad", "ORTH_FORMS"]

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


def _check_form(form: str) -> None:
    if form not in ORTH_FORMS:
        raise ValueError(f"method.orth_form: must be one of {ORTH_FORMS}, got {form!r}")


def _shape_groups(layers: Sequence[SVDLinear], form: str) -> dict[tuple, list[torch.nn.Parameter]]:
    """P and Q of every live adapter, grouped by role and shape (rank-0 adapters have nothing to keep
    orthogonal)."""
    _check_form(form)
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


class OrthGrad:
    """`orth_grad_` for a fixed list of layers, with the per-step host work cut to the minimum.

    The shape groups are planned once and replanned only when a layer's P or Q is a different tensor (a
    shrink swaps them): the check is one identity comparison per parameter. Each step then runs a few
    batched kernels per shape group and one multi-tensor add, as `orth_grad_` does, with the same results
    bit for bit. The training loop calls it once per optimizer step; it returns R (detached, unweighted).
    """

    def __init__(self, layers: Sequence[SVDLinear], weight: float, form: str = "mean_norm") -> None:
        _check_form(form)  # at construction, not at the first step
        self.layers, self.weight, self.form = list(layers), weight, form
        self._key: list[torch.Tensor] = []
        self._groups: list[tuple[bool, list[torch.nn.Parameter]]] = []
        self._params: list[torch.nn.Parameter] = []

    def _current(self) -> list[torch.Tensor]:
        # _parameters lookups, not module attribute access: this runs every step for every layer
        return [t for m in self.layers for t in (m._parameters["P"], m._parameters["Q"])]

    def _replan(self, key: list[torch.Tensor]) -> None:
        self._key = key
        self._groups = [(k[0] == "P", mats) for k, mats in _shape_groups(self.layers, self.form).items()]
        self._params = [p for _, mats in self._groups for p in mats]

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        key = self._current()
        if len(key) != len(self._key) or any(a is not b for a, b in zip(key, self._key)):
            self._replan(key)
        return _orth_grad(self._groups, self._params, 2 * len(self.layers), self.weight, self.form)


@torch.no_grad()
def orth_grad_(layers: Sequence[SVDLinear], weight: float, form: str = "mean_norm") -> torch.Tensor:
    """Add weight·∇R to every P.grad and Q.grad in place and return R (detached, unweighted).

    The same gradient as backpropagating `weight * orth_penalty(layers, form)`, computed in closed form
    per shape group (∇‖MᵀM − I‖²_F = 4·M(MᵀM − I)), so the regulariser costs a few batched kernels plus
    one multi-tensor add instead of an autograd graph with a node per matrix. Call it once per optimizer
    step, after gradients are unscaled and before clipping. `OrthGrad` does the same with the grouping
    planned once, for the training loop.
    """
    groups = [(k[0] == "P", mats) for k, mats in _shape_groups(layers, form).items()]
    return _orth_grad(groups, [p for _, mats in groups for p in mats], 2 * len(layers), weight, form)


def _orth_grad(groups: list[tuple[bool, list[torch.nn.Parameter]]], params: list[torch.nn.Parameter], n_mats: int,
               weight: float, form: str) -> torch.Tensor:
    if not groups:
        return torch.zeros(())
    grads: list[torch.Tensor] = []
    norms = []
    for left, mats in groups:
        m = torch.stack(mats).float()  # under no_grad: a plain copy, no autograd node
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
        grads += g.to(mats[0].dtype).unbind(0)
    have = [p.grad for p in params]
    if all(x is not None for x in have):
        torch._foreach_add_(have, grads)
    else:
        for p, x, g in zip(params, have, grads):
            if x is None:
                p.grad = g.clone()
            else:
                x.add_(g)
    n = torch.cat(norms)
    return n.square().sum() if form == "sum_sq" else n.sum() / n_mats
