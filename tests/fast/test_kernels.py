"""adarank/kernels.py: the Triton kernels against fp32 references, and the fused layer with them against the
fused layer without them (cuBLAS / torch). On a GPU they run compiled, in bf16 and fp16; without one, in
Triton's interpreter (tests/conftest.py), in fp16."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import rel_err

pytest.importorskip("triton")

from adarank.fast import fused, kernels
from adarank.fast.fused import Adapter, adapted_linears, grads_into_buffers

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.bfloat16, torch.float16] if DEV.type == "cuda" else [torch.float16]
# (tokens, out, rank, padded width): widths the fused layer uses, sizes that are not multiples of the tiles
SHAPES = [(200, 130, 8, 16), (64, 64, 12, 16), (100, 300, 3, 16), (70, 50, 20, 32), (33, 257, 16, 16)]


@pytest.fixture(autouse=True)
def _kernels_on():
    assert kernels.available(torch.empty(1, device=DEV, dtype=DTYPES[0]))
    yield
    kernels.enabled = True


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_lowrank_out_is_the_product_and_hands_back_the_rounded_padded_factor(dt, shape, with_bias):
    n, o, r, width = shape
    g = torch.Generator().manual_seed(n + o)
    stacked = torch.randn(n, 3 * width, generator=g).to(DEV, dt)
    t = stacked[:, width:2 * width]  # a column slice, as fused.py passes a group member's t
    t[:, r:] = 0  # a's padding rows are zero, so t's padding columns are
    b = torch.randn(o, r, generator=g).to(DEV)  # the fp32 parameter
    bias = torch.randn(o, generator=g).to(DEV, dt) if with_bias else None
    b_out = torch.full((o, width), float("nan"), device=DEV, dtype=dt)
    y = kernels.lowrank_out(t, b, bias, 0.3, b_out=b_out)
    expected_b = torch.zeros(o, width, device=DEV, dtype=dt)
    expected_b[:, :r] = (b * 0.3).to(dt)
    assert torch.equal(b_out, expected_b)  # every element written, padding exactly zero
    ref = t.float() @ expected_b.float().t() + (bias.float() if with_bias else 0)
    assert y.shape == (n, o) and y.dtype == dt
    assert rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("want", ["both", "grad_t", "grad_b"])
def test_lowrank_grads_reads_g_once_for_both_products(dt, shape, want):
    n, o, r, width = shape
    g_ = torch.Generator().manual_seed(7 * n + o)
    gy = torch.randn(o, n, generator=g_).to(DEV, dt).t()  # strided rows and columns, as a transposed gradient
    b = torch.zeros(o, width, device=DEV, dtype=dt)
    b[:, :r] = torch.randn(o, r, generator=g_).to(DEV, dt)
    t_buf = torch.randn(n, 3 * width, generator=g_).to(DEV, dt)
    t = t_buf[:, width:2 * width]
    t[:, r:] = 0
    gt_buf = torch.full((n, 3 * width), float("nan"), device=DEV, dtype=dt)
    gt = gt_buf[:, width:2 * width] if want != "grad_b" else None
    gb = torch.randn(o, r, generator=g_).to(DEV) if want != "grad_t" else None
    gb0 = gb.clone() if gb is not None else None
    kernels.lowrank_grads(gy, b, t, gt, gb, alpha=0.5)
    if gt is not None:
        assert rel_err(gt, gy.float() @ b.float()) < 1e-2
        assert torch.equal(gt[:, r:], torch.zeros_like(gt[:, r:]))  # g·0 in the padding columns
    assert torch.isnan(gt_buf[:, :width]).all() and torch.isnan(gt_buf[:, 2 * width:]).all()  # neighbours untouched
    if gb is not None:
        assert rel_err(gb, gb0 + 0.5 * gy.float().t() @ t[:, :r].float()) < 1e-4  # accumulated in fp32


def test_lowrank_grads_rejects_targets_it_cannot_fill():
    g = torch.randn(32, 48, device=DEV, dtype=DTYPES[0])
    b = torch.randn(48, 16, device=DEV, dtype=DTYPES[0])
    t = torch.randn(32, 16, device=DEV, dtype=DTYPES[0])
    with pytest.raises(ValueError, match="grad_t"):
        kernels.lowrank_grads(g, b, t, torch.empty(32, 8, device=DEV, dtype=DTYPES[0]), None)
    with pytest.raises(ValueError, match="grad_b"):
        kernels.lowrank_grads(g, b, t, None, torch.zeros(48, 8, device=DEV, dtype=torch.float64))


def test_deterministic_algorithms_switch_the_kernels_off():
    x = torch.empty(4, 4, device=DEV, dtype=DTYPES[0])
    assert kernels.available(x)
    torch.use_deterministic_algorithms(True)
    try:
        assert not kernels.available(x)
    finally:
        torch.use_deterministic_algorithms(False)
    assert not kernels.available(x.float())  # fp32 never: the fused path computes in half precision there


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tensors_off_the_current_gpu_take_cublas(monkeypatch):
    """Triton launches on the current device whatever device the tensors are on, so it must not serve others."""
    x = torch.empty(4, 4, device=DEV, dtype=torch.bfloat16)
    assert kernels.available(x)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: x.device.index + 1)
    assert not kernels.available(x)


def _group(seed: int, specs, param_dtype=torch.float32):
    """Adapters (kind, out, rank) on input width 48, with non-zero factors so every gradient flows."""
    g = torch.Generator().manual_seed(seed)
    ads, params = [], []
    for j, (kind, o, r) in enumerate(specs):
        w = (torch.randn(o, 48, generator=g) * 0.1).to(DEV, torch.bfloat16)
        bias = torch.randn(o, generator=g).to(DEV) if j == 0 else None
        p1 = torch.nn.Parameter((torch.randn(r, 48, generator=g) * 0.2).to(DEV, param_dtype))
        p2 = torch.nn.Parameter((torch.randn(o, r, generator=g) * 0.2).to(DEV, param_dtype))
        lam = torch.nn.Parameter(torch.randn(r, generator=g).to(DEV, param_dtype)) if kind == "svd" else None
        ads.append(Adapter(w, bias, kind, p1, p2, lam, 0.7))
        params += [p for p in (p1, p2, lam) if p is not None]
    return ads, params


def _run(specs, dt, use_kernels, into, param_dtype=torch.float32):
    kernels.enabled = use_kernels
    ads, params = _group(3, specs, param_dtype)
    x = torch.randn(96, 48, generator=torch.Generator().manual_seed(5)).to(DEV).requires_grad_(True)
    if into:
        for p in params:
            p.grad = torch.zeros_like(p)
    with torch.autocast(DEV.type, dtype=dt), (grads_into_buffers() if into else contextlib.nullcontext()):
        ys = adapted_linears(x, x, ads)
    weights = [torch.linspace(-1, 1, y.shape[1], device=DEV) for y in ys]
    sum((y.float() * w).sum() for y, w in zip(ys, weights)).backward()
    kernels.enabled = True
    return [y.detach().float() for y in ys] + [p.grad.float() for p in params] + [x.grad]


GROUPS = {
    "qkv": [("lora", 40, 8), ("lora", 24, 8), ("lora", 24, 8)],
    "mixed": [("lora", 40, 8), ("svd", 24, 12), ("svd", 70, 3)],
    "beyond_max_rank": [("lora", 40, 8), ("lora", 40, kernels.MAX_RANK + 8)],
}


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("into", [False, True])
def test_fused_layer_with_kernels_matches_it_without(dt, group, into, monkeypatch):
    calls = {"out": 0, "grads": 0}
    out_fn, grads_fn = kernels.lowrank_out, kernels.lowrank_grads

    def count(name, fn):
        def f(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return f

    monkeypatch.setattr(kernels, "lowrank_out", count("out", out_fn))
    monkeypatch.setattr(kernels, "lowrank_grads", count("grads", grads_fn))
    with_k = _run(GROUPS[group], dt, True, into)
    served = sum(r <= kernels.MAX_RANK for _, _, r in GROUPS[group])
    assert calls == {"out": served, "grads": served}
    without = _run(GROUPS[group], dt, False, into)
    assert calls == {"out": served, "grads": served}  # switched off: cuBLAS / torch only
    for a, b in zip(with_k, without):
        assert a.shape == b.shape
        assert rel_err(a, b) < 2e-2


@pytest.mark.parametrize("dt", DTYPES)
def test_half_precision_adapter_parameters_take_their_b_gradient_from_torch(dt):
    """The kernels add the b side's gradient in fp32; with bf16/fp16 parameters that product runs as a GEMM,
    and the kernel still computes grad_t."""
    specs = [("lora", 40, 8), ("svd", 24, 12)]
    with_k = _run(specs, dt, True, False, param_dtype=dt)
    without = _run(specs, dt, False, False, param_dtype=dt)
    for a, b in zip(with_k, without):
        assert a.dtype == b.dtype and rel_err(a, b) < 3e-2


def test_the_padding_follows_the_kernels():
    """Served adapters pad their rank to KERNEL_ALIGN (whole 32-byte rows for the kernels), others to ALIGN."""
    assert fused._padded(8, fused.KERNEL_ALIGN) == 16 and fused._padded(8) == 8
    assert fused._padded(20, fused.KERNEL_ALIGN) == 32 and fused._padded(12) == 16
