"""One autograd function for a frozen linear layer plus its low-rank adapter: y = x·Wᵀ + bias + (h·aᵀ)·bᵀ.

`method.fused` selects it for both adapter kinds (LoRA: a = A, b = scale·B; SVD: a = diag(λ·scale)·Q,
b = P). Against the unfused path (base linear, two thin matmuls, then `y + d`, with autograd summing
the input gradients) it saves work on token-sized tensors, which is what adapters cost on a GPU:
- the adapter's output is accumulated into y by the matmul itself (`addmm_`), with no separate add;
- backward accumulates the adapter's input gradient into the base's (`addmm_` again) when the adapter
  sees the same input as the base (no dropout), instead of two tensors and a sum;
- the rank dimension is zero-padded to a multiple of 8, so the thin matmuls get tensor-core aligned
  operands at any rank (an SVD adapter at rank 12, or after pruning, otherwise falls back to slow
  kernels). Zero columns add exact zeros: the function is unchanged.

The result equals the unfused path's up to rounding (the sums are rounded once instead of twice), so
runs with and without it are not bit-identical. Under autocast it computes in the autocast dtype, as
the unfused path does; without autocast it computes in the input's dtype, so the layers use it only when
that is the adapter's dtype (a bf16 base with fp32 adapters and no autocast takes the unfused path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ALIGN", "adapted_linear"]

#: the rank dimension is padded to a multiple of this (16 bytes of bf16/fp16: tensor-core alignment)
ALIGN = 8


def _pad_rank(m: torch.Tensor, dim: int) -> torch.Tensor:
    r = m.shape[dim]
    pad = -r % ALIGN
    if pad == 0:
        return m
    return F.pad(m, (0, pad) if dim == 1 else (0, 0, 0, pad))


def _factors(kind: str, p1: torch.Tensor, p2: torch.Tensor, lam: torch.Tensor | None, scale: float,
             dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) in the compute dtype, rank padded: LoRA (p1 = A, p2 = B): a = A, b = scale·B;
    SVD (p1 = Q, p2 = P): a = diag(λ·scale)·Q, b = P."""
    if kind == "lora":
        a, b = p1.to(dt), (p2 * scale).to(dt)
    else:
        a, b = (p1 * (lam * scale)[:, None]).to(dt), p2.to(dt)
    return _pad_rank(a, 0), _pad_rank(b, 1)


class _AdaptedLinear(torch.autograd.Function):
    """One autograd node for base + adapter: the factor preparation (scale, λ, cast, padding) happens
    inside, so eager mode dispatches a handful of ops per layer instead of a chain of small nodes.
    `weight` is in (out, in) orientation (a view is fine) and already in the compute dtype."""

    @staticmethod
    def forward(ctx, x, h, weight, bias, p1, p2, lam, kind, scale):
        out = weight.shape[0]
        a, b = _factors(kind, p1, p2, lam, scale, x.dtype)
        y = F.linear(x, weight, bias)
        t = F.linear(h, a)  # (..., r)
        y.view(-1, out).addmm_(t.reshape(-1, t.shape[-1]), b.t())
        ctx.same_input, ctx.kind, ctx.scale, ctx.r, ctx.p2_dtype = h is x, kind, scale, p1.shape[0], p2.dtype
        ctx.save_for_backward(h, weight, a, b, t, p1, lam)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        h, weight, a, b, t, p1, lam = ctx.saved_tensors
        out, r = weight.shape[0], ctx.r
        g = grad_y.reshape(-1, out)
        h2, t2 = h.reshape(-1, h.shape[-1]), t.reshape(-1, a.shape[0])
        need_x, need_h, _, _, need_p1, need_p2, need_lam, _, _ = ctx.needs_input_grad
        grad_t = g @ b  # (N, r_pad)
        grad_x = grad_h = grad_p1 = grad_p2 = grad_lam = None
        if need_p1 or need_lam:
            grad_a = (grad_t.t() @ h2)[:r].to(p1.dtype)  # the padded rows carry nothing back
            if ctx.kind == "lora":
                grad_p1 = grad_a
            else:  # a = Q·(λ·scale) row-wise
                v = lam * ctx.scale
                grad_p1 = grad_a * v[:, None] if need_p1 else None
                grad_lam = (grad_a * p1).sum(1) * ctx.scale if need_lam else None
        if need_p2:
            grad_b = (g.t() @ t2)[:, :r].to(ctx.p2_dtype)
            grad_p2 = grad_b * ctx.scale if ctx.kind == "lora" else grad_b
        if ctx.same_input and (need_x or need_h):
            grad_x = (g @ weight).addmm_(grad_t, a).view(*grad_y.shape[:-1], -1)
        else:
            if need_x:
                grad_x = (g @ weight).view(*grad_y.shape[:-1], -1)
            if need_h:
                grad_h = (grad_t @ a).view(*grad_y.shape[:-1], -1)
        return grad_x, grad_h, None, None, grad_p1, grad_p2, grad_lam, None, None


def adapted_linear(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   kind: str, p1: torch.Tensor, p2: torch.Tensor, lam: torch.Tensor | None = None,
                   scale: float = 1.0, transposed: bool = False) -> torch.Tensor:
    """base(x) + adapter(h) with the base's frozen `weight` ((in, out) if `transposed`, as Conv1D stores
    it, else (out, in)). kind "lora": p1 = A (r, in), p2 = B (out, r), ΔW = scale·B·A; kind "svd":
    p1 = Q (r, in), p2 = P (out, r), lam = λ (r,), ΔW = P·diag(λ·scale)·Q. Pass `h is x` when there is no
    dropout: backward then fuses the two input gradients. Returns y in the compute dtype."""
    dev = x.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    same = h is x
    x = x.to(dt)
    h = x if same else h.to(dt)
    w = (weight.t() if transposed else weight).to(dt)
    bias = bias.to(dt) if bias is not None else None
    with torch.autocast(dev, enabled=False):
        return _AdaptedLinear.apply(x, h, w, bias, p1, p2, lam, kind, scale)
