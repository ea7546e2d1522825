"""The fused base+adapter group (adarank/fast/fused.py) as `torch.library` custom ops, for torch.compile.

Dynamo cannot trace fused.py's autograd function (it writes into strided `out=` views and launches Triton
kernels), so under compile the fast path calls it as two opaque operators instead:
- `adarank::adapted_linears` (forward): the group's outputs, then what backward reads (the stacked a factor,
  t = h·aᵀ, each b factor and each SVD adapter's λ·scale);
- `adarank::adapted_linears_backward`: the input and factor gradients.
Each has a fake (meta) kernel, so the compiler knows the shapes without running them, and the forward op's
autograd formula calls the backward op. The compiler fuses the rest of the block (norms, attention,
activations, casts) around them. The Triton kernels run inside the ops (fused.py picks them as in eager
mode), so they need no registration of their own.

The same computation as eager mode (fused._forward / fused._backward), with two differences:
- gradients go to autograd even inside `fused.grads_into_buffers()`: a compiled graph must not write into
  tensors it was not given;
- the ops take lists, so one op can serve a group; the fast path gives each layer an op of its own (the
  siblings' run-time grouping is Python state that the compiler would re-check, and recompile on, at every
  forward).
A shrink changes the factors' shapes (and pruning to rank 0 their layout), so dynamo recompiles after it;
this is expected (the runner wraps the model in a new torch.compile after a shrink anyway).
"""

# no `from __future__ import annotations`: torch.library reads the ops' schemas from these annotations, and
# older torch versions take types, not strings (hence typing's List, Optional and Sequence too)
import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import fused

__all__ = ["adapted_linears"]

_OP = "adarank::adapted_linears"


def _meta(svd: Sequence[bool], scales: Sequence[float]) -> tuple[tuple[str, float], ...]:
    return tuple(("svd" if s else "lora", float(c)) for s, c in zip(svd, scales))


def _empty(like: Tensor) -> Tensor:
    """A placeholder where a list of tensors has no tensor to hold (an op returns no None)."""
    return like.new_empty(0)


def _lams(svd: Sequence[bool], lams: Sequence[Tensor]) -> List[Optional[Tensor]]:
    return [lam if s else None for s, lam in zip(svd, lams)]


@torch.library.custom_op(_OP, mutates_args=())
def _forward_op(x: Tensor, h: Tensor, same_input: bool, svd: Sequence[bool], scales: Sequence[float],
                weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]], p1s: Sequence[Tensor],
                p2s: Sequence[Tensor], lams: Sequence[Tensor]) -> List[Tensor]:
    """[y per adapter, a_all, t_all, b per adapter, v per adapter] (empty placeholders where fused._forward
    has None; a LoRA adapter's λ is a placeholder too)."""
    h = x if same_input else h
    with torch.autocast(x.device.type, enabled=False):  # computes in x's dtype, as in eager mode
        layout = fused._layout(x, p1s, p2s)
        ys, a_all, t_all, bs, vs = fused._forward(x, h, _meta(svd, scales), weights, biases, p1s, p2s,
                                                  _lams(svd, lams), layout)
    if a_all is None:
        a_all, t_all = x.new_empty((0, h.shape[-1])), x.new_empty((math.prod(h.shape[:-1]), 0))
    return [*ys, a_all, t_all, *(b if b is not None else _empty(x) for b in bs),
            *(v if v is not None else _empty(x) for v in vs)]


@_forward_op.register_fake
def _forward_fake(x, h, same_input, svd, scales, weights, biases, p1s, p2s, lams):
    ranks, pads, _, _ = fused._layout(x, p1s, p2s)
    width = sum(pads)
    n_tok = math.prod(x.shape[:-1])
    ys = [x.new_empty((*x.shape[:-1], w.shape[0])) for w in weights]
    bs = [x.new_empty((p2.shape[0], pad)) if r else _empty(x) for r, pad, p2 in zip(ranks, pads, p2s)]
    vs = [lam.new_empty(lam.shape) if s and r else _empty(x) for s, r, lam in zip(svd, ranks, lams)]
    return [*ys, x.new_empty((width, h.shape[-1])), x.new_empty((n_tok, width)), *bs, *vs]


@torch.library.custom_op("adarank::adapted_linears_backward", mutates_args=())
def _backward_op(grads: Sequence[Optional[Tensor]], h: Tensor, a_all: Tensor, t_all: Tensor, same_input: bool,
                 svd: Sequence[bool], scales: Sequence[float], needs: Sequence[bool], weights: Sequence[Tensor],
                 bs: Sequence[Tensor], vs: Sequence[Tensor], p1s: Sequence[Tensor], p2s: Sequence[Tensor],
                 lams: Sequence[Tensor]) -> List[Tensor]:
    """[grad_x, grad_h, then per adapter grad p1, p2, λ]. `needs`: (x, h, then per adapter p1, p2, λ) as
    autograd asks; a gradient not asked for is an empty placeholder, one asked for is always a tensor."""
    n = len(svd)
    meta = _meta(svd, scales)
    with torch.autocast(h.device.type, enabled=False):
        layout = fused._layout(h, p1s, p2s)
        ctx = _Context(meta, same_input, layout, fused._dtypes(p1s, p2s, _lams(svd, lams)), needs)
        width = sum(layout.pads)
        grad_x, grad_h, out = fused._backward(
            ctx, grads, h, a_all if width else None, t_all if width else None, weights,
            [b if r else None for b, r in zip(bs, layout.ranks)],
            [v if s and r else None for v, s, r in zip(vs, svd, layout.ranks)], p1s)
    params = [p for i in range(n) for p in (p1s[i], p2s[i], lams[i])]
    # a group's LoRA A gradients are row blocks of one GEMM's result: an op's outputs may not share memory
    gs = [g.clone() if g is not None and g._base is not None else g
          for i in range(n) for g in out[5 * i + fused._P1:5 * i + fused._LAM + 1]]
    gx_like = h.new_empty((*h.shape[:-1], weights[0].shape[1]))  # x has h's shape
    return [_filled(grad_x, needs[0] or (same_input and needs[1]), gx_like),
            _filled(grad_h, needs[1] and not same_input, h),
            *(_filled(g, need, p) for g, need, p in zip(gs, needs[2:], params))]


def _filled(grad: Optional[Tensor], need: bool, like: Tensor) -> Tensor:
    """The gradient if asked for (zeros where nothing flowed), else a placeholder."""
    if not need:
        return _empty(like)
    return grad if grad is not None else torch.zeros_like(like)


@_backward_op.register_fake
def _backward_fake(grads, h, a_all, t_all, same_input, svd, scales, needs, weights, bs, vs, p1s, p2s, lams):
    n = len(svd)
    params = [p for i in range(n) for p in (p1s[i], p2s[i], lams[i])]
    gx_like = h.new_empty((*h.shape[:-1], weights[0].shape[1]))
    return [gx_like.new_empty(gx_like.shape) if needs[0] or (same_input and needs[1]) else _empty(h),
            h.new_empty(h.shape) if needs[1] and not same_input else _empty(h),
            *(p.new_empty(p.shape) if need else _empty(p) for need, p in zip(needs[2:], params))]


class _Context:
    """What fused._backward reads of an autograd context (gradients go to autograd: `into` is None)."""

    into = None

    def __init__(self, meta, same_input: bool, layout: fused.Layout, dtypes, needs: Sequence[bool]) -> None:
        self.meta, self.same_input, self.dtypes = meta, same_input, dtypes
        self.ranks, self.pads, self.offs, self.ks = layout
        # in _AdaptedLinears' order: x, h, meta, then (weight, bias, p1, p2, lam) per adapter
        per = [(False, False, *needs[2 + 3 * i:5 + 3 * i]) for i in range(len(meta))]
        self.needs_input_grad = (needs[0], needs[1], False, *(b for p in per for b in p))


def _setup_context(ctx, inputs, output) -> None:
    x, h, same_input, svd, scales, weights, biases, p1s, p2s, lams = inputs
    n = len(svd)
    saved = output[n:]  # a_all, t_all, bs, vs
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)  # an output nobody used gets None: its adapter is skipped
    ctx.n, ctx.same_input, ctx.svd, ctx.scales = n, same_input, tuple(svd), tuple(scales)
    ctx.save_for_backward(x if same_input else h, *saved, *weights, *p1s, *p2s, *lams)


def _backward(ctx, grads):
    n = ctx.n
    saved = ctx.saved_tensors
    h, a_all, t_all = saved[:3]
    bs, vs, weights, p1s, p2s, lams = (list(saved[3 + k * n:3 + (k + 1) * n]) for k in range(6))
    need = ctx.needs_input_grad  # per input; a list input of tensors has a list of flags
    nx, nh = bool(need[0]), bool(need[1])
    # an adapter whose output got no gradient gives its factors none (None, as in eager mode, not zeros)
    flags = [(bool(need[7][i]), bool(need[8][i]), bool(need[9][i]) and ctx.svd[i]) if grads[i] is not None
             else (False, False, False) for i in range(n)]
    needs = [nx, nh, *(f for fl in flags for f in fl)]
    out = _backward_op(list(grads[:n]), h, a_all, t_all, ctx.same_input, ctx.svd, ctx.scales, needs, weights,
                       bs, vs, p1s, p2s, lams)
    grad_x = out[0] if needs[0] or (ctx.same_input and nh) else None
    grad_h = out[1] if nh and not ctx.same_input else None
    per = [[out[2 + 3 * i + k] if flags[i][k] else None for i in range(n)] for k in range(3)]

    def none_for(flag):  # the structure autograd expects back for an input that gets no gradient
        return [None] * len(flag) if isinstance(flag, (list, tuple)) else None

    return (grad_x, grad_h, None, None, None, none_for(need[5]), none_for(need[6]), *per)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def adapted_linears(x: Tensor, adapter_input: Tensor, adapters: Sequence[fused.Adapter]) -> tuple[Tensor, ...]:
    """`fused.adapted_linears` through the custom ops (the same arguments and result), for code that
    torch.compile traces."""
    dev = x.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    same = adapter_input is x
    x = x.to(dt)
    h = x if same else adapter_input.to(dt)
    ws = [(a.weight.t() if a.transposed else a.weight).to(dt) for a in adapters]
    biases = [a.bias.to(dt) if a.bias is not None else None for a in adapters]
    lams = [a.lam if a.lam is not None else _empty(a.p1) for a in adapters]
    out = _forward_op(x, h, same, [a.kind == "svd" for a in adapters], [float(a.scale) for a in adapters], ws,
                      biases, [a.p1 for a in adapters], [a.p2 for a in adapters], lams)
    return tuple(out[:len(adapters)])
