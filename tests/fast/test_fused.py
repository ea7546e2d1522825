"""The fused adapted layer (adarank/fast/fused.py, method.fused) against the unfused layers it replaces.

Both paths compute the same function; the fused one rounds its sums once instead of twice, so the
comparisons are to fp32 rounding (fp32) or bf16 rounding (under autocast), never bit for bit.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import BERT_TARGETS, adamw_curve, make_batch, rel_err, tiny_bert
from torch import nn
from transformers.pytorch_utils import Conv1D

import adarank
from adarank.fast.fused import (
    ALIGN,
    Adapter,
    _a_factor,
    _b_factor,
    _mm,
    _padded,
    adapted_linears,
    grads_into_buffers,
)
from adarank.layers import LoraLinear, SVDLinear


def _factors(kind: str, p1: torch.Tensor, p2: torch.Tensor, lam: torch.Tensor | None, scale: float,
             dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(a, b, v) of one adapter as the fused function prepares them, each factor in the compute dtype with
    the rank padded to ALIGN (see fused._a_factor and fused._b_factor)."""
    r = p1.shape[0]
    rp = _padded(r)
    a = p1.new_empty((rp, p1.shape[1]), dtype=dt)
    if rp != r:
        a[r:].zero_()
    v = _a_factor(kind, p1, lam, scale, a)
    return a, _b_factor(kind, p2, scale, dt, rp), v


def _pair(kind: str, base: nn.Module, r: int, dropout: float = 0.0):
    cls = LoraLinear if kind == "lora" else SVDLinear
    torch.manual_seed(0)
    plain = cls(base, r=r, alpha=2.0 * r, dropout=dropout)
    with torch.no_grad():  # non-zero B / λ, so the adapter contributes and every factor gets a gradient
        for p in plain.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    fused = copy.deepcopy(plain)
    fused.fused = True
    return plain, fused


def _grads(layer: nn.Module, x: torch.Tensor, seed: int = 7):
    torch.manual_seed(seed)  # the same dropout mask in both paths
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    named = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    return y.detach(), (x.grad.clone() if x.requires_grad else None), named


BASES = {
    "linear": lambda: nn.Linear(12, 20),
    "linear_nobias": lambda: nn.Linear(12, 20, bias=False),
    "conv1d": lambda: Conv1D(20, 12),  # GPT-2 style: weight stored (in, out)
}


@pytest.mark.parametrize("kind", ["lora", "svd"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("r", [3, 8, 12])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_equals_unfused_output_and_gradients_fp32(kind, base, r, dropout):
    torch.manual_seed(1)
    b = BASES[base]()
    plain, fused = _pair(kind, b, r, dropout)
    x = torch.randn(3, 5, 12, requires_grad=True)
    y0, gx0, g0 = _grads(plain, x)
    y1, gx1, g1 = _grads(fused, x)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx1, gx0, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g0.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", ["lora", "svd"])
def test_fused_input_without_grad(kind):
    plain, fused = _pair(kind, nn.Linear(12, 20), 4)
    x = torch.randn(6, 12)  # e.g. the first layer after a frozen embedding
    y0, gx0, g0 = _grads(plain, x)
    y1, gx1, g1 = _grads(fused, x)
    assert gx0 is None and gx1 is None
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["lora", "svd"])
def test_fused_under_bf16_autocast_matches_to_bf16_rounding(kind):
    plain, fused = _pair(kind, nn.Linear(64, 48), 12)
    x = torch.randn(4, 16, 64, requires_grad=True)
    out = []
    for layer in (plain, fused):
        xi = x.detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi)
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
        out.append((y.float(), xi.grad, {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}))
    (y0, gx0, g0), (y1, gx1, g1) = out

    assert rel_err(y1, y0) < 1e-2
    assert rel_err(gx1, gx0) < 1e-2
    for n in g0:
        assert g1[n].dtype == g0[n].dtype == torch.float32  # gradients reach the fp32 parameters
        assert rel_err(g1[n], g0[n]) < 1e-2, n


@pytest.mark.parametrize("r", [3, 8, 12])
def test_factors_are_padded_to_the_alignment_with_zeros_and_carry_the_scale(r):
    torch.manual_seed(0)
    p1, p2, lam = torch.randn(r, 7), torch.randn(5, r), torch.randn(r)
    rp = -(-r // ALIGN) * ALIGN
    a, b, v = _factors("lora", p1, p2, None, 0.5, torch.bfloat16)
    assert a.shape == (rp, 7) and b.shape == (5, rp) and a.dtype == b.dtype == torch.bfloat16 and v is None
    assert torch.equal(a[:r], p1.bfloat16()) and torch.equal(b[:, :r], (p2 * 0.5).bfloat16())
    assert not a[r:].any() and not b[:, r:].any()
    a, b, v = _factors("svd", p1, p2, lam, 0.5, torch.float32)
    assert torch.equal(v, lam * 0.5) and torch.equal(a[:r], p1 * v[:, None]) and torch.equal(b[:, :r], p2)
    assert not a[r:].any() and not b[:, r:].any()


def test_fused_merged_and_rank_zero_layers_are_the_base():
    base = nn.Linear(12, 20)
    _, fused = _pair("svd", base, 4)
    x = torch.randn(2, 12)
    with torch.no_grad():
        want = fused.base(x) + x @ fused.delta_weight().T
        fused.merge()
        torch.testing.assert_close(fused(x), want, rtol=1e-5, atol=1e-5)
        fused.unmerge()
    fused.keep(torch.tensor([], dtype=torch.long))  # pruned to rank 0
    with torch.no_grad():
        torch.testing.assert_close(fused(x), fused.base(x))


def test_fused_model_trains_like_the_unfused_one():
    """A tiny BERT with SVD adapters: 5 AdamW steps with and without method.fused stay together."""
    models = []
    for fused in (False, True):
        m = tiny_bert()
        m.train()
        adarank.inject(m, "svd", r=4, alpha=4.0, targets=BERT_TARGETS, fused=fused)
        for _, layer in adarank.svd_adapters(m):
            torch.manual_seed(3)
            torch.nn.init.normal_(layer.lam, std=0.5)
        models.append(m)
    assert all(layer.fused for _, layer in adarank.svd_adapters(models[1]))
    losses = [adamw_curve(m, [make_batch(seed=step) for step in range(5)]) for m in models]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    for (n, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)


def test_fused_is_refused_for_methods_without_our_adapters():
    from adarank.runner.config import MethodConfig

    for name in ("full", "peft_lora", "peft_adalora"):
        with pytest.raises(ValueError, match="method.fused"):
            MethodConfig(name=name, fused=True, r=8)
    MethodConfig(name="lora", fused=True)


def test_a_trained_base_falls_back_to_the_unfused_path():
    """The fused function gives the base no gradient: with an unfrozen base the layer must not use it."""
    plain, fused = _pair("lora", nn.Linear(12, 20), 4)
    for layer in (plain, fused):
        layer.base.weight.requires_grad_(True)
    x = torch.randn(5, 12)
    _, _, g0 = _grads(plain, x)
    _, _, g1 = _grads(fused, x)
    assert "base.weight" in g1
    torch.testing.assert_close(g1["base.weight"], g0["base.weight"])


@pytest.mark.parametrize("kind", ["lora", "svd"])
def test_without_autocast_a_half_precision_input_takes_the_unfused_path(kind, monkeypatch):
    """bf16 base, fp32 adapters, no autocast: the unfused layer computes the adapter in fp32; the fused
    function would compute it in bf16, so the layer must not use it (and gives the unfused result)."""
    import adarank.fast.serve as serve

    plain, fused = _pair(kind, nn.Linear(12, 20).to(torch.bfloat16), 4)
    calls = []
    real = serve.adapted_linear
    monkeypatch.setattr(serve, "adapted_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    y0, _, g0 = _grads(plain, x)
    y1, _, g1 = _grads(fused, x)
    assert not calls
    assert torch.equal(y0, y1) and all(torch.equal(g0[n], g1[n]) for n in g0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast both compute in bf16: fused
        fused(x)
    assert calls


@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_parameter_gradient_matmul_casts_then_scales(alpha):
    """_mm's fallback (CPU, or no out_dtype): the matmul, the cast to the parameter's dtype, the scale."""
    torch.manual_seed(0)
    m1, m2 = torch.randn(8, 32).bfloat16(), torch.randn(32, 5).bfloat16()
    got = _mm(m1, m2, torch.float32, alpha)
    assert got.dtype == torch.float32 and got.shape == (8, 5)
    torch.testing.assert_close(got, (m1 @ m2).float() * alpha, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="out_dtype GEMMs run on CUDA")
@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_parameter_gradient_matmul_writes_fp32_on_a_gpu(alpha):
    """On a GPU the bf16 GEMM writes fp32 (and applies alpha) itself: closer to the fp64 product than
    a bf16 result cast afterwards."""
    torch.manual_seed(0)
    m1, m2 = torch.randn(16, 4096, device="cuda").bfloat16(), torch.randn(4096, 8, device="cuda").bfloat16()
    got = _mm(m1, m2, torch.float32, alpha)
    exact = (m1.double() @ m2.double()) * alpha
    assert got.dtype == torch.float32
    assert (got.double() - exact).abs().max() <= ((m1 @ m2).double() * alpha - exact).abs().max()
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("cls", [LoraLinear, SVDLinear])
def test_fused_layers_compile_without_graph_breaks(cls):
    """Under torch.compile fused layers are custom ops (adarank/fast/ops.py), which dynamo traces whole."""
    torch.manual_seed(0)
    m = nn.Sequential(cls(nn.Linear(16, 32), r=12, alpha=24.0, fused=True), nn.ReLU(),
                      cls(nn.Linear(32, 8), r=12, alpha=24.0, fused=True))
    x = torch.randn(4, 16, requires_grad=True)
    assert torch._dynamo.explain(m)(x).graph_break_count == 0
    compiled = torch.compile(m, backend="aot_eager")
    torch.testing.assert_close(compiled(x), m(x))


# ---- groups of adapters on one input (adapted_linears) and gradients into buffers -------------------
def _adapter(kind: str, d_in: int, d_out: int, r: int, bias: bool, transposed: bool, seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, d_out, generator=g) if transposed else torch.randn(d_out, d_in, generator=g)
    b = torch.randn(d_out, generator=g) if bias else None
    p1 = torch.randn(r, d_in, generator=g).requires_grad_()
    p2 = torch.randn(d_out, r, generator=g).requires_grad_()
    lam = torch.randn(r, generator=g).requires_grad_() if kind == "svd" else None
    return Adapter(w, b, kind, p1, p2, lam, 0.7, transposed)


def _reference(a: Adapter, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The unfused computation of one adapter, by the definition of ΔW."""
    w = a.weight.t() if a.transposed else a.weight
    y = x @ w.t() + (a.bias if a.bias is not None else 0)
    if a.kind == "lora":
        return y + (h @ a.p1.t()) @ (a.scale * a.p2).t()
    return y + (h @ (a.p1 * (a.lam * a.scale)[:, None]).t()) @ a.p2.t()


GROUP = [("lora", 20, 3, True, False), ("svd", 8, 12, False, False), ("lora", 5, 8, False, True), ("svd", 20, 0, True, False)]


def _leaves(ads: list[Adapter]) -> list[torch.Tensor]:
    return [t for a in ads for t in (a.p1, a.p2, a.lam) if t is not None and t.requires_grad]


@pytest.mark.parametrize("same_input", [True, False])
def test_a_group_equals_its_adapters_by_definition(same_input):
    """LoRA and SVD adapters of different widths and ranks (one padded, one at rank 0), with and without
    bias, one with a Conv1D-style (in, out) weight, computed as one group: every output and every
    gradient (input, adapter input, factors, λ) matches each adapter computed alone by its definition."""
    ads = [_adapter(k, 12, o, r, b, t, seed=i) for i, (k, o, r, b, t) in enumerate(GROUP)]
    ads[3] = ads[3]._replace(p1=ads[3].p1.detach(), p2=ads[3].p2.detach(), lam=ads[3].lam.detach())  # rank 0: frozen
    x = torch.randn(2, 5, 12, requires_grad=True)
    h = x if same_input else torch.randn(2, 5, 12, requires_grad=True)
    ys = adapted_linears(x, h, ads)
    refs = [_reference(a, x, h) for a in ads]
    for y, ref in zip(ys, refs):
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gys = [torch.randn_like(r) for r in refs]
    ins = [x] + ([] if same_input else [h]) + _leaves(ads)
    got = torch.autograd.grad(ys, ins, gys)
    want = torch.autograd.grad(refs, ins, gys)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_a_group_gives_nothing_to_an_adapter_whose_output_is_unused():
    ads = [_adapter("lora", 12, 20, 4, False, False, seed=i) for i in range(3)]
    x = torch.randn(6, 12, requires_grad=True)
    ys = adapted_linears(x, x, ads)
    (ys[0].sum() + ys[2].square().sum()).backward()
    assert ads[1].p1.grad is None and ads[1].p2.grad is None
    ref = _reference(ads[0], x, x).sum() + _reference(ads[2], x, x).square().sum()
    want = torch.autograd.grad(ref, [x, ads[0].p1, ads[2].p2])
    torch.testing.assert_close(ads[0].p1.grad, want[1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ads[2].p2.grad, want[2], rtol=1e-4, atol=1e-4)


def _accumulation_adds(backward) -> int:
    """How many adds autograd's gradient accumulation (AccumulateGrad) runs during `backward()`."""
    with torch.profiler.profile() as prof:
        backward()
    return sum(c.name == "aten::add_" for e in prof.events() if e.name == "torch::autograd::AccumulateGrad"
               for c in e.cpu_children)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("kind", ["lora", "svd"])
@pytest.mark.parametrize("into", [False, True])
def test_grads_into_buffers_adds_into_existing_grads_itself(kind, n, into):
    """Inside grads_into_buffers, a parameter with a .grad gets its gradient added there by the layer
    itself, so autograd's accumulation adds nothing; a parameter whose .grad is None gets its gradient
    through autograd as usual. Outside, autograd adds into every existing .grad (the control)."""
    ads = [_adapter(kind, 12, 20, 8 if i else 5, False, False, seed=i) for i in range(n)]
    x = torch.randn(7, 12, requires_grad=True)
    gys = [torch.randn(7, 20) for _ in ads]
    want = torch.autograd.grad(list(adapted_linears(x, x, ads)), _leaves(ads), gys)
    leaves = _leaves(ads)
    for i, p in enumerate(leaves):
        if i % 4 != 3:  # every fourth parameter keeps .grad None
            p.grad = torch.full_like(p, 0.5)
    with grads_into_buffers() if into else contextlib.nullcontext():
        ys = adapted_linears(x, x, ads)
    adds = _accumulation_adds(lambda: torch.autograd.backward(list(ys), gys))
    for i, (p, w) in enumerate(zip(leaves, want)):
        torch.testing.assert_close(p.grad, w if i % 4 == 3 else w + 0.5, rtol=1e-4, atol=1e-4)
    assert adds == (0 if into else sum(i % 4 != 3 for i in range(len(leaves))))


def test_grads_into_buffers_is_read_when_the_forward_runs():
    ads = [_adapter("lora", 12, 20, 4, False, False, seed=0)]
    x = torch.randn(3, 12)
    ads[0].p1.grad = torch.zeros_like(ads[0].p1)
    ads[0].p2.grad = torch.zeros_like(ads[0].p2)
    with grads_into_buffers():
        y = adapted_linears(x, x, ads)[0]
    assert _accumulation_adds(lambda: y.sum().backward()) == 0  # outside the context, but the forward ran inside
    assert ads[0].p1.grad.abs().sum() > 0
