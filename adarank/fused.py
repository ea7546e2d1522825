"""One autograd function for a frozen linear layer plus its low-rank adapter: y = x·Wᵀ + bias + (h·aᵀ)·bᵀ.

`method.fused` selects it for both adapter kinds (LoRA: a = A, b = scale·B; SVD: a = diag(λ·scale)·Q,
b = P). Against the unfused path (base linear, two thin matmuls, then `y + d`, with autograd summing
the input gradients) it saves work on token-sized tensors, which is what adapters cost on a GPU:
- the adapter's thin matmul writes y and the base's matmul adds itself to it in its epilogue (`addmm_`),
  with no separate add; backward does the same for the input gradient when the adapter sees the base's
  input (no dropout), instead of two tensors and a sum;
- the rank dimension is zero-padded to a multiple of 8, so the thin matmuls get tensor-core aligned
  operands at any rank (an SVD adapter at rank 12, or after pruning, otherwise falls back to slow
  kernels). Zero columns add exact zeros: the function is unchanged;
- each factor is cast, scaled and padded by one kernel, and on a GPU the parameters' fp32 gradients come
  straight out of the GEMMs (`out_dtype`), so a layer adds few tiny kernels to a step.

The result equals the unfused path's up to rounding (the sums are rounded once instead of twice), so
runs with and without it are not bit-identical. Under autocast it computes in the autocast dtype, as
the unfused path does; without autocast it computes in the input's dtype, so the layers use it only when
that is the adapter's dtype (a bf16 base with fp32 adapters and no autocast takes the unfused path).
"""

from __future__ import annotations

import torch

__all__ = ["ALIGN", "adapted_linear"]

#: the rank dimension is padded to a multiple of this (16 bytes of bf16/fp16: tensor-core alignment)
ALIGN = 8


def _factors(kind: str, p1: torch.Tensor, p2: torch.Tensor, lam: torch.Tensor | None, scale: float,
             dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(a, b, v): a and b in the compute dtype with the rank padded to ALIGN, one kernel per factor (the
    cast and the scaling write straight into the padded buffer). LoRA (p1 = A, p2 = B): a = A,
    b = scale·B, v None; SVD (p1 = Q, p2 = P): v = λ·scale, a = diag(v)·Q, b = P."""
    r = p1.shape[0]
    rp = r + (-r % ALIGN)
    a = p1.new_empty((rp, p1.shape[1]), dtype=dt)
    b = p2.new_empty((p2.shape[0], rp), dtype=dt)
    if rp != r:
        a[r:].zero_()
        b[:, r:].zero_()
    v = None
    if kind == "lora":
        a[:r].copy_(p1)
        torch.mul(p2, scale, out=b[:, :r])
    else:
        v = lam * scale
        torch.mul(p1, v[:, None], out=a[:r])
        b[:, :r].copy_(p2)
    return a, b, v


#: torch.mm / torch.addmm take `out_dtype` (torch >= 2.8; CUDA): a bf16 GEMM can write fp32 directly
_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype")


def _mm(m1: torch.Tensor, m2: torch.Tensor, dtype: torch.dtype, alpha: float = 1.0) -> torch.Tensor:
    """alpha·(m1 @ m2) as a `dtype` tensor (a parameter's gradient). On a GPU with half-precision inputs and
    an fp32 parameter the GEMM writes fp32 itself, scaled by alpha, so there is no cast or scale kernel
    after it (and no bf16 rounding of the gradient); elsewhere it is the matmul, the cast, then the scale."""
    if _OUT_DTYPE and m1.is_cuda and dtype == torch.float32 and m1.dtype in (torch.bfloat16, torch.float16):
        if alpha == 1.0:
            return torch.mm(m1, m2, out_dtype=dtype)
        out = m1.new_empty((m1.shape[0], m2.shape[1]), dtype=dtype)
        return torch.addmm(out, m1, m2, out_dtype=dtype, beta=0, alpha=alpha, out=out)
    out = torch.mm(m1, m2).to(dtype)
    return out if alpha == 1.0 else out.mul_(alpha)


class _AdaptedLinear(torch.autograd.Function):
    """One autograd node for base + adapter: the factor preparation (scale, λ, cast, padding) happens
    inside, so eager mode dispatches a handful of ops per layer instead of a chain of small nodes.
    `weight` is in (out, in) orientation (a view is fine) and already in the compute dtype.

    Order of the sums: the adapter's thin matmul writes y (and, in backward, the input gradient) first and
    the base's matmul then adds itself to it in its epilogue (`addmm_`, beta = 1). The big matmul is
    compute-bound, so reading y there is nearly free, while the other order (base first, then the thin
    matmul reading and writing y) costs a whole extra pass over a token-sized tensor per matrix."""

    @staticmethod
    def forward(ctx, x, h, weight, bias, p1, p2, lam, kind, scale):
        out = weight.shape[0]
        a, b, v = _factors(kind, p1, p2, lam, scale, x.dtype)
        x2, h2 = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
        t = torch.mm(h2, a.t())  # (N, r_pad)
        y = torch.mm(t, b.t()) if bias is None else torch.addmm(bias, t, b.t())
        y.addmm_(x2, weight.t())
        ctx.same_input, ctx.kind, ctx.scale, ctx.r = h is x, kind, scale, p1.shape[0]
        ctx.dtypes = (p1.dtype, p2.dtype, lam.dtype if lam is not None else None)
        ctx.save_for_backward(h, weight, a, b, t, p1, v)
        return y.view(*x.shape[:-1], out)

    @staticmethod
    def backward(ctx, grad_y):
        h, weight, a, b, t, p1, v = ctx.saved_tensors
        r, scale = ctx.r, ctx.scale
        g = grad_y.reshape(-1, weight.shape[0])
        h2 = h.reshape(-1, h.shape[-1])
        need_x, need_h, _, _, need_p1, need_p2, need_lam, _, _ = ctx.needs_input_grad
        grad_t = g @ b  # (N, r_pad)
        grad_x = grad_h = grad_p1 = grad_p2 = grad_lam = None
        if need_p1 or need_lam:
            grad_a = _mm(grad_t.t(), h2, ctx.dtypes[0])[:r]  # the padded rows carry nothing back
            if ctx.kind == "lora":
                grad_p1 = grad_a
            else:  # a = diag(v)·Q
                grad_p1 = grad_a * v[:, None] if need_p1 else None
                grad_lam = (torch.linalg.vecdot(grad_a, p1) * scale).to(ctx.dtypes[2]) if need_lam else None
        if need_p2:  # LoRA's b = scale·B: the GEMM applies the scale
            grad_p2 = _mm(g.t(), t, ctx.dtypes[1], scale if ctx.kind == "lora" else 1.0)[:, :r]
        if ctx.same_input and (need_x or need_h):
            grad_x = torch.mm(grad_t, a)
            grad_x.addmm_(g, weight)
            grad_x = grad_x.view(*grad_y.shape[:-1], -1)
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
