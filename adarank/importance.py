"""Importance scores of AdaLoRA (Zhang et al., 2023, eq. 8-11) as pure functions.

Every function takes lists of tensors and uses `torch._foreach_*` ops, so one call is a handful of
multi-tensor kernels however many adapted matrices there are. The arithmetic is written term by term
(β·Ī + (1−β)·I, not a lerp) so results match PEFT's `RankAllocator` bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["SCORES", "sensitivity", "smooth_", "uncertainty_", "element_score", "triplet_score"]

Tensors = Sequence[torch.Tensor]

#: Selectable scores: the paper's s = Ī·Ū, and its ablations (sensitivity only; |λ| magnitude).
SCORES = ("uncertainty", "sensitivity", "magnitude")


def sensitivity(params: Tensors, grads: Tensors) -> list[torch.Tensor]:
    """I = |θ·∇θ| per element."""
    out = torch._foreach_mul(list(params), list(grads))
    torch._foreach_abs_(out)
    return out


def smooth_(ema: Tensors, value: Tensors, beta: float) -> None:
    """Ī ← β·Ī + (1−β)·I, in place."""
    torch._foreach_mul_(list(ema), beta)
    torch._foreach_add_(list(ema), torch._foreach_mul(list(value), 1 - beta))


def uncertainty_(unc: Tensors, ipt: Tensors, ipt_ema: Tensors, beta: float) -> None:
    """Ū ← β·Ū + (1−β)·|I − Ī|, in place (Ī already updated for this step)."""
    dev = torch._foreach_sub(list(ipt), list(ipt_ema))
    torch._foreach_abs_(dev)
    torch._foreach_mul_(dev, 1 - beta)
    torch._foreach_mul_(list(unc), beta)
    torch._foreach_add_(list(unc), dev)


def element_score(ipt_ema: Tensors, unc: Tensors, kind: str) -> list[torch.Tensor]:
    """s = Ī·Ū (kind "uncertainty") or s = Ī (kind "sensitivity")."""
    if kind == "uncertainty":
        return torch._foreach_mul(list(ipt_ema), list(unc))
    if kind == "sensitivity":
        return list(ipt_ema)
    raise ValueError(f"allocator.score: element scores exist for uncertainty/sensitivity, not {kind!r}")


def triplet_score(s_lam: torch.Tensor, s_P: torch.Tensor, s_Q: torch.Tensor) -> torch.Tensor:
    """S_i = s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji), batched.

    Shapes: s_lam (G, r), s_P (G, out, r), s_Q (G, r, in) for G stacked matrices of one shape.
    """
    return s_lam + (s_Q.mean(dim=-1) + s_P.mean(dim=-2))
