"""Triton kernels for the adapters' token-sized low-rank products (used by adarank/fast/fused.py on a GPU).

An adapter of rank r on N tokens computes, besides its base matmul, products whose one side is thin:
- forward: y = t·bᵀ (N × out, from t = h·aᵀ of N × r), which the base matmul then adds itself to;
- backward: grad_t = g·b (N × r) and the b factor's gradient gᵀ·t (out × r), from the output's
  gradient g (N × out).
They move token-sized tensors and do almost no arithmetic, so their cost is memory traffic. cuBLAS runs
them as general GEMMs: two passes over g in backward (and a split-K reduction kernel for gᵀ·t, whose
reduction dimension is the N tokens), and small output tiles in forward. Here:
- `lowrank_out` writes y in large tiles (bias added in the same pass);
- `lowrank_grads` reads g once for both products: each program takes a band of rows of g, keeps its rows
  of grad_t in registers over the whole width, and adds its share of gᵀ·t into the fp32 result with
  atomic adds (so no reduction kernel and, inside `fused.grads_into_buffers`, straight into `.grad`).

The atomic adds make gᵀ·t's summation order vary from run to run (fp32 rounding only). When torch is
asked for deterministic algorithms (`torch.use_deterministic_algorithms(True)`), `available` is False and
fused.py uses cuBLAS. Both kernels accumulate in fp32 and take ranks up to `MAX_RANK` (padded inside to a
power of two of at least 16, the tensor cores' smallest width).

Without Triton, or off a GPU, `available` is False. `TRITON_INTERPRET=1` runs the kernels on a CPU, in fp16
only (tests/conftest.py sets it where there is no GPU, so the CPU tests run them).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch has no Triton: fused.py computes with torch alone
    triton = None

__all__ = ["MAX_RANK", "available", "enabled", "lowrank_grads", "lowrank_out"]

#: larger ranks take cuBLAS: the products are then less thin, and the kernels' registers would spill
MAX_RANK = 64
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: switch off to A/B against cuBLAS (experiments/bench/layer_ab.py); fused.py reads it at each forward
enabled = True


def available(*ts: torch.Tensor) -> bool:
    """Whether the kernels serve these tensors: Triton present, in half precision on the current GPU (Triton
    launches there, whatever device the tensors are on; under the interpreter: fp16 on any device, as it
    multiplies bf16 blocks wrongly, seen with Triton 3.9), and no deterministic algorithms asked for."""
    if triton is None or not enabled or torch.are_deterministic_algorithms_enabled():
        return False
    if _INTERPRET:
        return all(t.dtype == torch.float16 for t in ts)
    return all(t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) and t.device.index == torch.cuda.current_device()
               for t in ts)


def _rank_block(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


if triton is not None:

    @triton.jit
    def _out_kernel(t_ptr, b_ptr, bias_ptr, y_ptr, bq_ptr, M, O, R, RBW, scale, stride_t, stride_b, stride_y, stride_bq,
                    HAS_BIAS: tl.constexpr, WRITE_BQ: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    RB: tl.constexpr):
        pid_m = tl.program_id(0)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        rr = tl.arange(0, RB)
        t = tl.load(t_ptr + rm[:, None] * stride_t + rr[None, :], mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        b = tl.load(b_ptr + rn[:, None] * stride_b + rr[None, :], mask=(rn[:, None] < O) & (rr[None, :] < RBW), other=0.0)
        bq = (b * scale).to(t.dtype)  # the b factor as cuBLAS would get it: scaled, then rounded
        if WRITE_BQ:  # noqa: SIM102 - a compile-time switch around a run-time test
            if pid_m == 0:  # the first row of programs hands it to backward, padded with zeros to R columns
                tl.store(bq_ptr + rn[:, None] * stride_bq + rr[None, :], bq, mask=(rn[:, None] < O) & (rr[None, :] < R))
        acc = tl.dot(t, tl.trans(bq))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < O, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_y + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < O))

    @triton.jit
    def _grads_kernel(g_ptr, b_ptr, t_ptr, gt_ptr, gb_ptr, M, O, R, RG, alpha,
                      stride_gm, stride_go, stride_b, stride_t, stride_gt, stride_gb,
                      WANT_T: tl.constexpr, WANT_B: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, RB: tl.constexpr):
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rr = tl.arange(0, RB)
        row_ok = rm < M
        if WANT_B:
            t = tl.load(t_ptr + rm[:, None] * stride_t + rr[None, :], mask=row_ok[:, None] & (rr[None, :] < R), other=0.0)
        acc_t = tl.zeros((BM, RB), dtype=tl.float32)
        for n0 in range(0, O, BN):
            rn = n0 + tl.arange(0, BN)
            col_ok = rn < O
            g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_go,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            if WANT_T:
                b = tl.load(b_ptr + rn[:, None] * stride_b + rr[None, :], mask=col_ok[:, None] & (rr[None, :] < R),
                            other=0.0)
                acc_t += tl.dot(g, b)
            if WANT_B:
                part = tl.dot(tl.trans(g), t) * alpha
                tl.atomic_add(gb_ptr + rn[:, None] * stride_gb + rr[None, :], part,
                              mask=col_ok[:, None] & (rr[None, :] < RG), sem="relaxed")
        if WANT_T:
            tl.store(gt_ptr + rm[:, None] * stride_gt + rr[None, :], acc_t.to(gt_ptr.dtype.element_ty),
                     mask=row_ok[:, None] & (rr[None, :] < R))

#: (BM, BN, num_warps, num_stages) of each kernel: the fastest on an H200 over W3's shapes (out 256, 1024 and
#: 2816 on 8192 tokens, ranks 8 and 12), by experiments/bench/kernel_sweep.py --sweep
OUT_CONFIG = (128, 64, 4, 1)
GRADS_CONFIG = (64, 256, 8, 4)


def lowrank_out(t: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, scale: float = 1.0,
                b_out: torch.Tensor | None = None) -> torch.Tensor:
    """(Both kernels launch on the current CUDA device: the tensors must be on it; see `available`.)

    t·(scale·b)ᵀ (+ bias) as a new (N, out) tensor in t's dtype, with scale·b rounded to t's dtype first (as
    a cuBLAS path would round its factor). t: (N, R), rows may be strided (a column slice of a group's stacked
    t); b: (out, r) with r ≤ R, a parameter in any float dtype, contiguous rows (t's columns beyond r meet
    zeros). `b_out`, if given, an (out, R) tensor in t's dtype, receives that rounded scale·b, zero-padded:
    backward's factor, at no extra pass."""
    n, width = t.shape
    o, r = b.shape
    y = t.new_empty((n, o))
    if o == 0:
        return y
    bm, bn, warps, stages = OUT_CONFIG
    grid = (max(1, triton.cdiv(n, bm)), triton.cdiv(o, bn))
    _out_kernel[grid](t, b, bias if bias is not None else b, y, b_out if b_out is not None else y, n, o, width, r,
                      float(scale), t.stride(0), b.stride(0), y.stride(0), b_out.stride(0) if b_out is not None else 0,
                      HAS_BIAS=bias is not None, WRITE_BQ=b_out is not None, BM=bm, BN=bn, RB=_rank_block(width),
                      num_warps=warps, num_stages=stages)
    return y


def lowrank_grads(g: torch.Tensor, b: torch.Tensor, t: torch.Tensor, grad_t: torch.Tensor | None,
                  grad_b: torch.Tensor | None, alpha: float = 1.0) -> None:
    """In one pass over g (N, out): grad_t = g·b written into `grad_t` (N, R) in its dtype, and alpha·gᵀ·t
    added into `grad_b` (out, r), fp32, for t's first r ≤ R columns (the others are a fused layer's zero
    padding). Either target may be None (not computed).

    b: (out, R) and t: (N, R), in g's dtype. Rows of g, t and grad_t may be strided (column slices of a
    group's stacked tensors); the columns of b, t, grad_t and grad_b must be contiguous."""
    n, o = g.shape
    width = b.shape[1]
    if n == 0 or (grad_t is None and grad_b is None):
        return
    if grad_t is not None and grad_t.shape[1] != width:
        raise ValueError(f"lowrank_grads: grad_t has {grad_t.shape[1]} columns, b has {width}")
    if grad_b is not None and (grad_b.dtype != torch.float32 or grad_b.stride(1) != 1 or grad_b.shape[1] > width):
        raise ValueError("lowrank_grads: grad_b must be fp32 with contiguous columns, at most as many as b's")
    bm, bn, warps, stages = GRADS_CONFIG
    dummy = g
    _grads_kernel[(triton.cdiv(n, bm),)](
        g, b, t, grad_t if grad_t is not None else dummy, grad_b if grad_b is not None else dummy,
        n, o, width, grad_b.shape[1] if grad_b is not None else 0, float(alpha), g.stride(0), g.stride(1),
        b.stride(0), t.stride(0), grad_t.stride(0) if grad_t is not None else 0,
        grad_b.stride(0) if grad_b is not None else 0,
        WANT_T=grad_t is not None, WANT_B=grad_b is not None, BM=bm, BN=bn, RB=_rank_block(width),
        num_warps=warps, num_stages=stages)
