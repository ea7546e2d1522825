"""Frozen linear layers plus their low-rank adapters in one autograd function: y = x·Wᵀ + bias + (h·aᵀ)·bᵀ.

The adapter layers' `fused` switch (`method.fused` in the runner) selects it for both adapter kinds (LoRA:
a = A, b = scale·B; SVD: a = diag(λ·scale)·Q, b = P). Against the unfused path (base linear, two thin
matmuls, then `y + d`, with autograd summing the input gradients) it saves work on token-sized tensors,
which is what adapters cost on a GPU:
- the adapter's thin matmul writes y and the base's matmul adds itself to it in its epilogue (`addmm_`),
  with no separate add; backward does the same for the input gradient when the adapter sees the base's
  input (no dropout), instead of two tensors and a sum;
- several adapted layers that read one input (q, k and v; gate and up: adarank/fast/siblings.py) form one
  call: their factors are stacked, so the input is read once by the forward's thin matmul and once by
  the A-side gradient's, and their input gradients are summed in the base matmuls' epilogues;
- the rank dimension is zero-padded to a multiple of 8 (16 where the Triton kernels serve), so the thin
  matmuls get tensor-core aligned operands at any rank (an SVD adapter at rank 12, or after pruning,
  otherwise falls back to slow kernels). Zero columns add exact zeros: the function is unchanged;
- on a GPU with Triton, the thin products on token-sized tensors run in adarank/fast/kernels.py: the
  forward's t·bᵀ in large tiles (its kernel reads b's parameter and writes backward's bf16 copy on the
  way), and backward's grad_t = g·b with the b gradient gᵀ·t in one pass over g instead of two cuBLAS GEMMs;
- each factor is cast, scaled and padded by one kernel, and on a GPU the parameters' fp32 gradients come
  straight out of the GEMMs (`out_dtype`), so a layer adds few tiny kernels to a step. Inside
  `grads_into_buffers()` (the CUDA-graph step) those GEMMs also add themselves into the existing `.grad`
  buffers, so autograd's separate accumulation kernel per parameter disappears too.

The result equals the unfused path's up to rounding (the sums are rounded once instead of twice), so
runs with and without it are not bit-identical. Under autocast it computes in the autocast dtype, as
the unfused path does; without autocast it computes in the input's dtype, so the layers use it only when
that is the adapter's dtype (a bf16 base with fp32 adapters and no autocast takes the unfused path).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from . import kernels

__all__ = ["ALIGN", "Adapter", "adapted_linear", "adapted_linears", "grads_into_buffers"]

#: the rank dimension is padded to a multiple of this (16 bytes of bf16/fp16: tensor-core alignment)
ALIGN = 8
#: ... and of this where adarank/fast/kernels.py computes the thin products: their tiles are 16 wide, and rows
#: of 32 bytes let them load t, b and grad_t in whole vectors
KERNEL_ALIGN = 16


class Adapter(NamedTuple):
    """One adapted matrix for `adapted_linears`. `weight` is the frozen base's ((in, out) if `transposed`,
    as Conv1D stores it, else (out, in)). kind "lora": p1 = A (r, in), p2 = B (out, r), ΔW = scale·B·A;
    kind "svd": p1 = Q (r, in), p2 = P (out, r), lam = λ (r,), ΔW = P·diag(λ·scale)·Q."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    kind: str
    p1: torch.Tensor
    p2: torch.Tensor
    lam: torch.Tensor | None = None
    scale: float = 1.0
    transposed: bool = False


_INTO_GRAD = False


@contextlib.contextmanager
def grads_into_buffers() -> Iterator[None]:
    """Forwards run inside add their parameters' gradients, in backward, straight into the parameters'
    existing `.grad` tensors (the weight-gradient GEMM accumulates in its epilogue) instead of handing
    them to autograd, which would add each one with a kernel of its own. For loops that keep gradients in
    persistent buffers and accumulate into them (adarank.fast.graphs.GraphedStep); gradient hooks on the
    parameters (DDP's, for one) do not see these gradients. A parameter whose `.grad` is None still gets
    its gradient through autograd. Read at forward time: the backward may run on another thread."""
    global _INTO_GRAD
    prev, _INTO_GRAD = _INTO_GRAD, True
    try:
        yield
    finally:
        _INTO_GRAD = prev


def _padded(r: int, align: int = ALIGN) -> int:
    return r + (-r % align)


def _a_factor(kind: str, p1: torch.Tensor, lam: torch.Tensor | None, scale: float,
              a: torch.Tensor) -> torch.Tensor | None:
    """Write the a factor into `a` ((padded rank, in) in the compute dtype, padding rows already zero) with
    one kernel (cast and scaling in one); returns v. LoRA (p1 = A): a = A, v None; SVD (p1 = Q):
    v = λ·scale, a = diag(v)·Q."""
    r = p1.shape[0]
    if kind == "lora":
        a[:r].copy_(p1)
        return None
    v = lam * scale
    torch.mul(p1, v[:, None], out=a[:r])
    return v


def _b_factor(kind: str, p2: torch.Tensor, scale: float, dt: torch.dtype, rp: int) -> torch.Tensor:
    """The b factor in the compute dtype with the rank padded to rp, one kernel (plus one zeroing the
    padding): LoRA (p2 = B): b = scale·B; SVD (p2 = P): b = P."""
    r = p2.shape[1]
    b = p2.new_empty((p2.shape[0], rp), dtype=dt)
    if rp != r:
        b[:, r:].zero_()
    if kind == "lora":
        torch.mul(p2, scale, out=b[:, :r])
    else:
        b[:, :r].copy_(p2)
    return b


#: torch.mm / torch.addmm take `out_dtype` (torch >= 2.8; CUDA): a bf16 GEMM can write fp32 directly
_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype") and hasattr(torch.ops.aten.addmm, "dtype")


def _mm(m1: torch.Tensor, m2: torch.Tensor, dtype: torch.dtype, alpha: float = 1.0,
        acc: torch.Tensor | None = None) -> torch.Tensor:
    """alpha·(m1 @ m2) as a `dtype` tensor (a parameter's gradient), or added into `acc` (a `dtype` tensor)
    in place. On a GPU with half-precision inputs and an fp32 parameter the GEMM writes (or accumulates
    into) fp32 itself, scaled by alpha, so there is no cast, scale or add kernel after it (and no bf16
    rounding of the gradient); elsewhere it is the matmul, the cast, the scale, then the add."""
    if _OUT_DTYPE and m1.is_cuda and dtype == torch.float32 and m1.dtype in (torch.bfloat16, torch.float16):
        if acc is not None:
            return torch.addmm(acc, m1, m2, out_dtype=dtype, beta=1, alpha=alpha, out=acc)
        if alpha == 1.0:
            return torch.mm(m1, m2, out_dtype=dtype)
        out = m1.new_empty((m1.shape[0], m2.shape[1]), dtype=dtype)
        return torch.addmm(out, m1, m2, out_dtype=dtype, beta=0, alpha=alpha, out=out)
    out = torch.mm(m1, m2).to(dtype)
    if acc is not None:
        return acc.add_(out, alpha=alpha)
    return out if alpha == 1.0 else out.mul_(alpha)


def _give(p: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor | None:
    """Hand `grad` to autograd (p None), or add it into p.grad and hand nothing."""
    if p is None:
        return grad
    p.grad.add_(grad)
    return None


#: `_AdaptedLinears` takes x, h and meta (`_LEADING` inputs), then five tensors per adapter (weight, bias, p1,
#: p2, lam); these are the factors' positions among the five (backward returns gradients in the same order)
_LEADING = 3
_P1, _P2, _LAM = 2, 3, 4


def _needs(ctx, i: int, k: int) -> bool:
    """Whether autograd wants the gradient of adapter i's tensor k (`_P1`, `_P2`, `_LAM`)."""
    return ctx.needs_input_grad[_LEADING + 5 * i + k]


def _into(ctx, i: int, k: int) -> torch.Tensor | None:
    """Adapter i's parameter k (`_P1`, `_P2`, `_LAM`) when backward adds its gradient into its .grad (inside
    `grads_into_buffers`, and it has one), else None: the gradient goes to autograd."""
    if ctx.into is None:
        return None
    p = ctx.into[k - _P1][i]
    return p if p.grad is not None else None


class _AdaptedLinears(torch.autograd.Function):
    """One autograd node for n base + adapter pairs that read one input: the factor preparation (scale, λ,
    cast, padding) happens inside, so eager mode dispatches a handful of ops per layer instead of a chain
    of small nodes. Inputs: x (the base's input), h (the adapters', x itself when there is no dropout),
    meta ((kind, scale) per adapter), then (weight, bias, p1, p2, lam) per adapter, each `weight` in
    (out, in) orientation (a view is fine) and already in the compute dtype.

    The adapters' a factors are stacked into one (R, in) matrix (each one's rank padded), so T = h·Aᵀ is one
    thin matmul for the group and its gradient Aᵀ-side one GEMM. Order of the sums: each adapter's thin
    matmul writes its y (and, in backward, the group's one input gradient) first and the base's matmul
    then adds itself to it in its epilogue (`addmm_`, beta = 1). The big matmul is compute-bound, so
    reading y there is nearly free, while the other order (base first, then the thin matmul reading and
    writing y) costs a whole extra pass over a token-sized tensor per matrix."""

    @staticmethod
    def forward(ctx, x, h, meta, *tensors):
        ws, biases, p1s, p2s, lams = (tensors[k::5] for k in range(5))
        layout = _layout(x, p1s, p2s)
        ys, a_all, t_all, bs, vs = _forward(x, h, meta, ws, biases, p1s, p2s, lams, layout)
        ctx.meta, ctx.same_input = meta, h is x
        ctx.ranks, ctx.pads, ctx.offs, ctx.ks = layout
        ctx.set_materialize_grads(False)  # an output nobody used gets None, not zeros: its adapter is skipped
        # the parameters themselves, so that backward can reach their .grad (only inside grads_into_buffers)
        ctx.into = (p1s, p2s, lams) if _INTO_GRAD else None  # in the order _P1, _P2, _LAM
        ctx.dtypes = _dtypes(p1s, p2s, lams)
        ctx.save_for_backward(h, a_all, t_all, *ws, *bs, *vs, *p1s)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *grads):
        n = len(ctx.meta)
        saved = ctx.saved_tensors
        h, a_all, t_all = saved[:3]
        ws, bs, vs, p1s = (saved[3 + k * n:3 + (k + 1) * n] for k in range(4))
        grad_x, grad_h, out = _backward(ctx, grads, h, a_all, t_all, ws, bs, vs, p1s)
        return (grad_x, grad_h, None, *out)


class Layout(NamedTuple):
    """Where each adapter's (padded) rank sits in a group's stacked factors: its rank, padded rank and
    offset, and whether the kernels compute its thin products."""

    ranks: list[int]
    pads: list[int]
    offs: list[int]
    ks: list[bool]


def _layout(x: torch.Tensor, p1s: Sequence[torch.Tensor], p2s: Sequence[torch.Tensor]) -> Layout:
    """The group's layout from the shapes alone (adarank/fast/ops.py's shape functions call it too). Per
    adapter: do the kernels compute its thin products? The forward's reads b's parameter itself and writes
    backward's padded bf16 b on the way, so preparing b costs no kernel of its own."""
    use_k = kernels.available(x.reshape(-1, x.shape[-1]))  # decided once, for backward too
    ranks = [p1.shape[0] for p1 in p1s]
    ks = [use_k and r <= kernels.MAX_RANK and p2.stride(-1) == 1 for r, p2 in zip(ranks, p2s)]
    pads = [_padded(r, KERNEL_ALIGN if k else ALIGN) for r, k in zip(ranks, ks)]
    offs = [0, *itertools.accumulate(pads)][:len(ranks)]
    return Layout(ranks, pads, offs, ks)


def _dtypes(p1s, p2s, lams) -> list[tuple[torch.dtype, torch.dtype, torch.dtype | None]]:
    """The parameters' dtypes per adapter (their gradients' dtypes), in the order _P1, _P2, _LAM."""
    return [(p1.dtype, p2.dtype, lam.dtype if lam is not None else None) for p1, p2, lam in zip(p1s, p2s, lams)]


def _forward(x, h, meta, ws, biases, p1s, p2s, lams, layout: Layout):
    """The forward of a group (see `_AdaptedLinears`): (ys, a_all, t_all, bs, vs), the last four what backward
    reads (a_all and t_all None when every rank is 0; bs[i] None at rank 0, vs[i] None but for SVD)."""
    n = len(meta)
    ranks, pads, offs, ks = layout
    x2, h2 = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
    width = sum(pads)
    bs, vs = [None] * n, [None] * n
    a_all = t_all = None
    if width:
        # padding rows must be zero: they meet the zero padding columns of b, but 0·NaN garbage would not
        a_all = (h2.new_zeros if width != sum(ranks) else h2.new_empty)((width, h2.shape[1]))
        for i, (kind, scale) in enumerate(meta):
            if ranks[i]:
                vs[i] = _a_factor(kind, p1s[i], lams[i], scale, a_all[offs[i]:offs[i] + pads[i]])
                bs[i] = (p2s[i].new_empty((p2s[i].shape[0], pads[i]), dtype=x.dtype) if ks[i]
                         else _b_factor(kind, p2s[i], scale, x.dtype, pads[i]))
        t_all = torch.mm(h2, a_all.t())  # (N, R): the input is read once for the whole group
    ys = []
    for i in range(n):
        w, bias = ws[i], biases[i]
        if ranks[i]:
            t = t_all[:, offs[i]:offs[i] + pads[i]]
            if ks[i]:
                y = kernels.lowrank_out(t, p2s[i], bias, _b_scale(meta[i]), b_out=bs[i])
            else:
                y = torch.mm(t, bs[i].t()) if bias is None else torch.addmm(bias, t, bs[i].t())
            y.addmm_(x2, w.t())
        else:  # an SVD adapter pruned to rank 0: the base alone
            y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
        ys.append(y.view(*x.shape[:-1], w.shape[0]))
    return ys, a_all, t_all, bs, vs


def _backward(ctx, grads, h, a_all, t_all, ws, bs, vs, p1s):
    """The backward of a group: (grad_x, grad_h, out), out holding five gradients per adapter (weight, bias,
    p1, p2, lam; None where not computed). `ctx` is the autograd context, or anything with the attributes
    `_AdaptedLinears.forward` sets on it and `needs_input_grad` (adarank/fast/ops.py passes one)."""
    n = len(ctx.meta)
    need = ctx.needs_input_grad
    h2 = h.reshape(-1, h.shape[-1])
    gs = [g.reshape(-1, g.shape[-1]) if g is not None else None for g in grads]
    live = [bool(ctx.ranks[i]) and gs[i] is not None for i in range(n)]  # adapters a gradient flows through
    out: list[torch.Tensor | None] = [None] * (5 * n)  # per adapter: (weight, bias, p1, p2, lam)
    need_in = need[0] or need[1]
    a_side = [i for i in range(n) if live[i] and (_needs(ctx, i, _P1) or _needs(ctx, i, _LAM))]
    grad_t = None
    if a_all is not None and any(live) and (need_in or a_side):
        grad_t = t_all.new_empty(t_all.shape)
    for i in range(n):
        if ctx.ranks[i]:
            _grad_t_and_b(ctx, i, gs[i], bs[i], t_all, grad_t, out)
    _a_side_grads(ctx, a_side, grad_t, h2, vs, p1s, out)
    grad_x, grad_h = _input_grads(ctx, gs, ws, grad_t, a_all, h, need_in)
    return grad_x, grad_h, out


def _grad_t_and_b(ctx, i: int, g: torch.Tensor | None, b: torch.Tensor, t_all: torch.Tensor,
                  grad_t: torch.Tensor | None, out: list[torch.Tensor | None]) -> None:
    """Adapter i's columns of grad_t = g·b, and the b side's gradient gᵀ·t (into `out` or the parameter's
    .grad); one pass over g where the kernels serve. Columns of an adapter whose output got no gradient
    are zeros."""
    span = slice(ctx.offs[i], ctx.offs[i] + ctx.pads[i])
    gt = grad_t[:, span] if grad_t is not None else None
    if g is None:
        if gt is not None:
            gt.zero_()
        return
    t = t_all[:, ctx.offs[i]:ctx.offs[i] + ctx.ranks[i]]
    alpha = _b_scale(ctx.meta[i])  # LoRA's b = scale·B: its gradient is scale·gᵀ·t
    p2 = _into(ctx, i, _P2)
    gb = p2.grad if p2 is not None else None
    want_b = _needs(ctx, i, _P2)
    if ctx.ks[i]:  # both products in one pass over g (gᵀ·t through cuBLAS if its gradient is not fp32)
        k_gb = want_b and _fp32_rows(ctx.dtypes[i][1], gb)
        if k_gb and gb is None:
            gb = out[5 * i + _P2] = torch.zeros((g.shape[1], ctx.ranks[i]), dtype=torch.float32, device=g.device)
        kernels.lowrank_grads(g, b, t_all[:, span], gt, gb if k_gb else None, alpha)
        want_b = want_b and not k_gb
    elif gt is not None:
        torch.mm(g, b, out=gt)
    if want_b:
        if gb is None:
            out[5 * i + _P2] = _mm(g.t(), t, ctx.dtypes[i][1], alpha)
        else:
            _mm(g.t(), t, ctx.dtypes[i][1], alpha, acc=gb)


def _a_side_grads(ctx, a_side: list[int], grad_t: torch.Tensor | None, h2: torch.Tensor,
                  vs: Sequence[torch.Tensor | None], p1s: Sequence[torch.Tensor],
                  out: list[torch.Tensor | None]) -> None:
    """The a side's gradients of the adapters in `a_side` (those that want them): grad_tᵀ·h, one GEMM for the
    group (the input is read once), then each adapter's share (see `_give_a_grad`)."""
    if len(a_side) == 1 and ctx.meta[a_side[0]][0] == "lora" and _into(ctx, a_side[0], _P1) is not None:
        # one LoRA adapter wants its A gradient: it accumulates straight into A.grad
        i = a_side[0]
        span = slice(ctx.offs[i], ctx.offs[i] + ctx.ranks[i])
        _mm(grad_t[:, span].t(), h2, ctx.dtypes[i][0], acc=_into(ctx, i, _P1).grad)
        return
    if not a_side:
        return
    grad_a = _mm(grad_t.t(), h2, ctx.dtypes[a_side[0]][0])  # (R, in): the input is read once
    for i in a_side:
        ga = grad_a[ctx.offs[i]:ctx.offs[i] + ctx.ranks[i]].to(ctx.dtypes[i][0])
        _give_a_grad(ctx, i, ga, vs[i], p1s[i], out)


def _give_a_grad(ctx, i: int, ga: torch.Tensor, v: torch.Tensor | None, p1: torch.Tensor,
                 out: list[torch.Tensor | None]) -> None:
    """From adapter i's gradient of its a factor: LoRA's A gradient (a = A); SVD's Q and λ gradients
    (a = diag(v)·Q, v = λ·scale), each into `out` or the parameter's .grad."""
    kind, scale = ctx.meta[i]
    if kind == "lora":
        out[5 * i + _P1] = _give(_into(ctx, i, _P1), ga)
        return
    if _needs(ctx, i, _P1):  # a = diag(v)·Q
        q = _into(ctx, i, _P1)
        if q is None:
            out[5 * i + _P1] = ga * v[:, None]
        else:
            q.grad.addcmul_(ga, v[:, None])
    if _needs(ctx, i, _LAM):
        gl = torch.linalg.vecdot(ga, p1).to(ctx.dtypes[i][2])
        lam = _into(ctx, i, _LAM)
        if lam is None:
            out[5 * i + _LAM] = gl.mul_(scale)
        else:
            lam.grad.add_(gl, alpha=scale)


def _input_grads(ctx, gs: Sequence[torch.Tensor | None], ws: Sequence[torch.Tensor], grad_t: torch.Tensor | None,
                 a_all: torch.Tensor | None, h: torch.Tensor,
                 need_in: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(gradient of x, gradient of h): one fused tensor when h is x, else each as autograd asks."""
    need = ctx.needs_input_grad
    grad_x = grad_h = None
    if ctx.same_input and need_in:
        grad_x = _input_grad(gs, ws, grad_t, a_all)
    else:
        if need[0]:
            grad_x = _input_grad(gs, ws, None, None)
        if need[1] and grad_t is not None:
            grad_h = torch.mm(grad_t, a_all).view(h.shape)
    if grad_x is not None:
        grad_x = grad_x.view(*h.shape[:-1], -1)
    return grad_x, grad_h


def _b_scale(meta: tuple[str, float]) -> float:
    """The factor between b and its parameter: LoRA's b = scale·B, SVD's b = P."""
    kind, scale = meta
    return scale if kind == "lora" else 1.0


def _fp32_rows(dtype: torch.dtype, grad: torch.Tensor | None) -> bool:
    """Whether kernels.lowrank_grads can produce a gradient of this dtype (fp32), adding into `grad` if
    given (an fp32 tensor with contiguous rows)."""
    return dtype == torch.float32 and (grad is None or (grad.dtype == torch.float32 and grad.is_contiguous()))


def _input_grad(gs: Sequence[torch.Tensor | None], ws: Sequence[torch.Tensor], grad_t: torch.Tensor | None,
                a_all: torch.Tensor | None) -> torch.Tensor | None:
    """Σ g_i·W_i (+ grad_t·A): the adapters' thin matmul writes the sum first, each base matmul adds itself
    in its epilogue, so the group's input gradient is one tensor with no separate adds."""
    gx = torch.mm(grad_t, a_all) if grad_t is not None else None
    for g, w in zip(gs, ws):
        if g is not None:
            gx = torch.mm(g, w) if gx is None else gx.addmm_(g, w)
    return gx


def adapted_linears(x: torch.Tensor, adapter_input: torch.Tensor,
                    adapters: Sequence[Adapter]) -> tuple[torch.Tensor, ...]:
    """base_i(x) + adapter_i(adapter_input) for every adapter, computed together (see the module docstring).
    Pass `adapter_input is x` when there is no dropout: backward then fuses the input gradients. Returns the
    outputs in the compute dtype (the autocast dtype, else x's)."""
    dev = x.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    same = adapter_input is x
    x = x.to(dt)
    h = x if same else adapter_input.to(dt)
    flat: list[torch.Tensor | None] = []
    for a in adapters:
        w = (a.weight.t() if a.transposed else a.weight).to(dt)
        flat += [w, a.bias.to(dt) if a.bias is not None else None, a.p1, a.p2, a.lam]
    meta = tuple((a.kind, a.scale) for a in adapters)
    with torch.autocast(dev, enabled=False):
        return _AdaptedLinears.apply(x, h, meta, *flat)


def adapted_linear(x: torch.Tensor, adapter_input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   kind: str, p1: torch.Tensor, p2: torch.Tensor, lam: torch.Tensor | None = None,
                   scale: float = 1.0, transposed: bool = False) -> torch.Tensor:
    """base(x) + adapter(adapter_input) for one adapter (the other arguments are those of `Adapter`)."""
    return adapted_linears(x, adapter_input, (Adapter(weight, bias, kind, p1, p2, lam, scale, transposed),))[0]
