"""The fused group as custom ops (adarank/fast/ops.py): torch.library's own consistency checks, the same numbers as
the eager autograd function, and a compiled BERT that keeps its fused adapters as opaque ops with no graph break.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BERT_TARGETS, make_batch, tiny_bert
from torch import nn

import adarank
from adarank.fast import fused, kernels, ops
from adarank.fast.fused import Adapter
from adarank.layers import LoraLinear, SVDLinear

#: (kind, out, rank, bias, transposed) on input width 12: a padded LoRA rank, an SVD rank past the alignment,
#: a Conv1D-style weight, and an SVD adapter pruned to rank 0
GROUP = [("lora", 20, 3, True, False), ("svd", 8, 12, False, False), ("lora", 5, 8, False, True),
         ("svd", 6, 0, True, False)]


def _adapters(dt: torch.dtype) -> list[Adapter]:
    g = torch.Generator().manual_seed(0)
    out = []
    for kind, o, r, bias, transposed in GROUP:
        w = torch.randn(*((12, o) if transposed else (o, 12)), generator=g).to(dt)
        b = torch.randn(o, generator=g).to(dt) if bias else None
        p1 = (torch.randn(r, 12, generator=g) * 0.5).to(dt).requires_grad_(r > 0)
        p2 = (torch.randn(o, r, generator=g) * 0.5).to(dt).requires_grad_(r > 0)
        lam = torch.randn(r, generator=g).to(dt).requires_grad_(r > 0) if kind == "svd" else None
        out.append(Adapter(w, b, kind, p1, p2, lam, 0.7, transposed))
    return out


def _op_args(x, h, ads):
    """The forward op's arguments, as ops.adapted_linears builds them."""
    ws = [a.weight.t() if a.transposed else a.weight for a in ads]
    lams = [a.lam if a.lam is not None else a.p1.new_empty(0) for a in ads]
    return (x, h, x is h, [a.kind == "svd" for a in ads], [a.scale for a in ads], ws, [a.bias for a in ads],
            [a.p1 for a in ads], [a.p2 for a in ads], lams)


@pytest.mark.parametrize("dt,same_input", [(torch.float32, True), (torch.float16, False)])
def test_the_ops_pass_torch_library_opcheck(dt, same_input):
    """Schema, fake (meta) kernels against the real ones, the autograd registration and AOT dispatch, for the
    forward op (its autograd formula runs the backward op) and the backward op. In fp16 the Triton kernels
    compute the thin products (under the interpreter on a CPU), and the layout pads for them."""
    if dt == torch.float16 and not kernels.available(torch.empty(1, dtype=dt)):
        pytest.skip("the Triton kernels do not serve here")
    ads = _adapters(dt)
    x = torch.randn(2, 5, 12, dtype=dt, requires_grad=True)
    h = x if same_input else torch.randn(2, 5, 12, dtype=dt, requires_grad=True)
    args = _op_args(x, h, ads)
    assert fused._layout(x, args[7], args[8]).ks == [dt == torch.float16] * len(ads)
    torch.library.opcheck(ops._forward_op, args)
    out = ops._forward_op(*args)
    n = len(ads)
    grads = [torch.randn_like(y) for y in out[:n]]
    grads[2] = None  # an output nobody used
    back = (grads, h, out[n], out[n + 1], same_input, args[3], args[4], [True, not same_input] + [True] * 3 * n,
            args[5], out[n + 2:2 * n + 2], out[2 * n + 2:], args[7], args[8], args[9])
    torch.library.opcheck(ops._backward_op, _detached(back))


def _detached(tree):
    if isinstance(tree, (list, tuple)):
        return type(tree)(_detached(t) for t in tree)
    return tree.detach() if torch.is_tensor(tree) else tree


@pytest.mark.parametrize("same_input", [True, False])
def test_the_ops_compute_what_the_eager_function_computes(same_input):
    """ops.adapted_linears runs fused.py's own forward and backward: the same outputs and gradients, bit for bit,
    also when an output gets no gradient."""
    x = torch.randn(2, 5, 12, requires_grad=True)
    h = x if same_input else torch.randn(2, 5, 12, requires_grad=True)
    results = []
    for fn in (fused.adapted_linears, ops.adapted_linears):
        ads = _adapters(torch.float32)
        ys = fn(x, h, ads)
        leaves = [x] + ([] if same_input else [h]) + [t for a in ads for t in (a.p1, a.p2, a.lam)
                                                      if t is not None and t.requires_grad]
        loss = sum((y * torch.linspace(-1, 1, y.shape[-1])).sum() for i, y in enumerate(ys) if i != 2)
        results.append([y.detach() for y in ys] + list(torch.autograd.grad(loss, leaves, allow_unused=True)))
    assert [g is None for g in results[1]] == [g is None for g in results[0]]
    for a, b in zip(*results):
        assert a is None or torch.equal(a, b)


def _fused_bert(kind: str) -> nn.Module:
    """A one-block tiny BERT with fused adapters whose every factor is non-zero (λ too, one entry masked)."""
    model = tiny_bert(layers=1)
    torch.manual_seed(1)
    adarank.inject(model, kind, r=4, alpha=8.0, targets=BERT_TARGETS, fused=True, train_modules=["classifier"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "classifier" not in name:
                p.normal_(0, 0.3)
        for _, m in adarank.svd_adapters(model):
            m.lam[0] = 0.0  # the allocator's mask zeroes λ in place: the op sees it as a value
    return model


def _loss_and_grads(model: nn.Module, batch) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(**batch).loss
    return [loss.detach(), *torch.autograd.grad(loss, params)]


class _CountingBackend:
    """aot_eager, counting the adarank ops in each graph dynamo hands it."""

    def __init__(self) -> None:
        self.ops: list[int] = []

    def __call__(self, gm: torch.fx.GraphModule, inputs):
        self.ops.append(sum(str(node.target).startswith("adarank.") for node in gm.graph.nodes))
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)


@pytest.mark.parametrize("kind", ["lora", "svd"])
def test_a_compiled_bert_keeps_its_fused_adapters(kind):
    """Under torch.compile(fullgraph=True) every fused layer is one adarank op in a single graph, and the loss and
    every gradient equal eager fused mode's (up to fp32 rounding: the compiler reorders the ops around them).
    After a shrink (SVD: one layer to 2 triplets, one to rank 0) the compiled model recompiles and still agrees."""
    model = _fused_bert(kind)
    batch = make_batch(n=2, seq=5)
    n_layers = len(adarank.svd_adapters(model)) if kind == "svd" else sum(
        isinstance(m, LoraLinear) for m in model.modules())
    backend = _CountingBackend()
    compiled = torch.compile(model, fullgraph=True, backend=backend)  # fullgraph: a graph break is an error
    rounds = ["as built", "shrunk"] if kind == "svd" else ["as built"]
    for step in rounds:
        if step == "shrunk":
            layers = [m for _, m in adarank.svd_adapters(model)]
            layers[0].keep(torch.tensor([1, 3]))
            layers[1].keep(torch.tensor([], dtype=torch.long))
        for got, want in zip(_loss_and_grads(compiled, batch), _loss_and_grads(model, batch)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # one graph of the model per round (the shrink recompiled it), with every fused layer in it as an op; the
    # graphs without ops are the model's forward-count hook (adarank/fast/siblings.py), a frame of its own
    assert [k for k in backend.ops if k] == [n_layers] * len(rounds)


def test_compiled_fused_layers_under_autocast_compute_in_its_dtype():
    """Under bf16 autocast the compiled ops compute in bf16, as eager fused mode does."""
    torch.manual_seed(0)
    m = nn.Sequential(LoraLinear(nn.Linear(16, 32), r=4, alpha=8.0, fused=True), nn.GELU(),
                      SVDLinear(nn.Linear(32, 8), r=4, alpha=8.0, fused=True))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(6, 16)
    backend = _CountingBackend()
    compiled = torch.compile(copy.deepcopy(m), fullgraph=True, backend=backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = compiled(x), m(x)
    assert backend.ops == [2]
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
