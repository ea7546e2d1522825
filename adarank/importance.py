"""Importance scores of AdaLoRA (Zhang et al., 2023, eq. 8-11) as pure functions on tensors.

The allocator calls them on flat buffers that hold every adapted matrix at once, so one call is one
kernel however many matrices there are. The arithmetic is written term by term (β·Ī + (1−β)·I, not a
lerp) so results match PEFT's `RankAllocator` bit for bit.
"""

from __future__ import annotations

import torch

__all__ = ["SCORES", "sensitivity", "smooth_", "uncertainty_", "element_score", "triplet_score"]

#: Selectable scores: the paper's s = Ī·Ū, and its ablations (sensitivity only; |λ| magnitude).
SCORES = ("uncertainty", "sensitivity", "magnitude")


def sensitivity(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """I = |θ·∇θ| per element."""
    return (param * grad).abs_()


def smooth_(ema: torch.Tensor, value: torch.Tensor, beta: float) -> torch.Tensor:
    """Ī ← β·Ī + (1−β)·I, in place."""
    return ema.mul_(beta).add_(value * (1 - beta))


def uncertainty_(unc: torch.Tensor, ipt: torch.Tensor, ipt_ema: torch.Tensor, beta: float) -> torch.Tensor:
    """Ū ← β·Ū + (1−β)·|I − Ī|, in place (Ī already updated for this step)."""
    return unc.mul_(beta).add_((ipt - ipt_ema).abs_().mul_(1 - beta))


def element_score(ipt_ema: torch.Tensor, unc: torch.Tensor, kind: str) -> torch.Tensor:
    """s = Ī·Ū (kind "uncertainty") or s = Ī (kind "sensitivity")."""
    if kind == "uncertainty":
        return ipt_ema * unc
    if kind == "sensitivity":
        return ipt_ema
    raise ValueError(f"method.score: element scores exist for uncertainty/sensitivity, not {kind!r}")


def triplet_score(s_lam: torch.Tensor, s_P: torch.Tensor, s_Q: torch.Tensor) -> torch.Tensor:
    """S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji), batched.

    Shapes: s_lam (G, r), s_P (G, out, r), s_Q (G, r, in) for G stacked matrices of one shape.
    """
    return s_lam + (s_Q.mean(dim=-1) + s_P.mean(dim=-2))
