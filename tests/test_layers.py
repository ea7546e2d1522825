"""adarank.layers: LoraLinear against PEFT's LoRA layer, SVDLinear against its formula, merge, dtypes."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from adarank.layers import LoraLinear, SVDLinear, base_dims

IN, OUT, R = 12, 10, 4


def make_base(kind: str, seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT) if kind == "linear" else Conv1D(OUT, IN)
    with torch.no_grad():
        base.bias.normal_()  # Conv1D starts with a zero bias; a random one checks it is kept
    return base.to(dtype)


class Holder(nn.Module):
    """One layer named `proj`, so PEFT can target it."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    """max |a − b| ≤ tol · max(1, max |b|): 1e-6 relative to the tensor's scale (float32 has 6e-8 ulps)."""
    err, ref = (a - b).abs().max().item(), max(1.0, b.abs().max().item())
    assert err <= tol * ref, f"max abs diff {err:.3g} > {tol:g} × {ref:.3g}"


def x_input(seed: int = 5, dtype=torch.float32, requires_grad=False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, IN, generator=g).to(dtype).requires_grad_(requires_grad)


def peft_lora(base: nn.Module, alpha: float, rslora: bool):
    """PEFT's LoRA layer around a copy of `base` (fan_in_fan_out for Conv1D, as GPT-2 needs)."""
    cfg = LoraConfig(
        r=R, lora_alpha=alpha, target_modules=["proj"], use_rslora=rslora, fan_in_fan_out=isinstance(base, Conv1D)
    )
    return get_peft_model(Holder(copy.deepcopy(base)), cfg).base_model.model.proj


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_matches_peft_lora_outputs_and_grads(kind, rslora):
    alpha = 6.0
    base = make_base(kind)
    theirs = peft_lora(base, alpha, rslora)
    mine = LoraLinear(copy.deepcopy(base), r=R, alpha=alpha, rslora=rslora)
    assert mine.scale == theirs.scaling["default"] == (alpha / math.sqrt(R) if rslora else alpha / R)
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_()  # B = 0 at init would hide any error in B or the scale
        mine.lora_A.copy_(theirs.lora_A["default"].weight)
        mine.lora_B.copy_(theirs.lora_B["default"].weight)
    x1, x2 = x_input(requires_grad=True), x_input(requires_grad=True)
    y_mine, y_theirs = mine(x1), theirs(x2)
    assert_close(y_mine, y_theirs)
    assert (y_mine - mine.base(x1)).abs().max() > 0.1  # the adapter contributes
    w = torch.randn_like(y_mine)
    (y_mine * w).sum().backward()
    (y_theirs * w).sum().backward()
    assert_close(mine.lora_A.grad, theirs.lora_A["default"].weight.grad)
    assert_close(mine.lora_B.grad, theirs.lora_B["default"].weight.grad)
    assert_close(x1.grad, x2.grad)


@pytest.mark.parametrize("cls", [LoraLinear, SVDLinear])
@pytest.mark.parametrize("rslora,expected", [(False, 8.0 / 4), (True, 8.0 / 2)])
def test_scale_alpha_over_r_or_sqrt_r(cls, rslora, expected):
    assert cls(make_base("linear"), r=4, alpha=8.0, rslora=rslora).scale == expected


@pytest.mark.parametrize("cls", [LoraLinear, SVDLinear])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fresh_adapter_computes_the_base_function(cls, kind):
    base = make_base(kind)
    layer = cls(copy.deepcopy(base), r=R, alpha=8.0)
    x = x_input()
    assert torch.equal(layer(x), base(x))
    assert base_dims(base) == (IN, OUT) == (layer.in_features, layer.out_features)


def test_lora_init_like_peft():
    """B = 0 and A ~ Kaiming-uniform(a=√5), i.e. U(−1/√in, 1/√in)."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(400, 30), r=16, alpha=16.0)
    assert layer.lora_A.shape == (16, 400) and layer.lora_B.shape == (30, 16)
    assert torch.equal(layer.lora_B, torch.zeros(30, 16))
    bound = 1 / math.sqrt(400)
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.99 * bound
    assert abs(layer.lora_A.std().item() - bound / math.sqrt(3)) < 0.03 * bound


def test_svd_init_statistics():
    torch.manual_seed(0)
    layer = SVDLinear(nn.Linear(300, 200), r=64, alpha=64.0)
    assert layer.P.shape == (200, 64) and layer.lam.shape == (64,) and layer.Q.shape == (64, 300)
    assert torch.equal(layer.lam, torch.zeros(64))
    for p in (layer.P, layer.Q):  # ~13k–19k samples: std within 3% of 0.02
        assert abs(p.std().item() - 0.02) < 0.02 * 0.03
        assert abs(p.mean().item()) < 0.001
    assert layer.r == layer.r_init == 64


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("rslora", [False, True])
def test_svd_forward_is_p_diag_lam_q(kind, rslora):
    base = make_base(kind)
    layer = SVDLinear(copy.deepcopy(base), r=R, alpha=6.0, rslora=rslora)
    with torch.no_grad():
        layer.lam.normal_()
    x = x_input()
    scale = 6.0 / (math.sqrt(R) if rslora else R)
    delta = layer.P.double() @ torch.diag(layer.lam.double() * scale) @ layer.Q.double()  # (out, in)
    expected = x.double() @ delta.T + base(x).double()
    assert_close(layer(x).double(), expected)
    torch.testing.assert_close(layer.delta_weight().double(), delta, rtol=0, atol=1e-7)


def _randomize(layer: nn.Module) -> None:
    with torch.no_grad():
        if isinstance(layer, SVDLinear):
            layer.lam.normal_()
            layer.P.normal_(std=0.3)
        else:
            layer.lora_B.normal_()


@pytest.mark.parametrize("cls", [LoraLinear, SVDLinear])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_round_trip(cls, kind):
    layer = cls(make_base(kind), r=R, alpha=8.0)
    _randomize(layer)
    x = x_input()
    w0 = layer.base.weight.detach().clone()
    y0 = layer(x)
    layer.merge()
    assert layer.merged and not torch.equal(layer.base.weight, w0)
    assert_close(layer(x), y0)
    # merged base alone computes the adapted function: the delta went in with the right orientation
    assert_close(layer.base(x), y0)
    layer.merge()  # idempotent
    assert_close(layer(x), y0)
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.base.weight, w0)
    assert_close(layer(x), y0)


@pytest.mark.parametrize("cls", [LoraLinear, SVDLinear])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_base_stays_frozen_under_training(cls, kind):
    layer = cls(make_base(kind), r=R, alpha=8.0)
    _randomize(layer)
    base_before = {n: p.detach().clone() for n, p in layer.base.named_parameters()}
    assert all(not p.requires_grad for p in layer.base.parameters())
    trainable = [p for p in layer.parameters() if p.requires_grad]
    adapter_before = [p.detach().clone() for p in trainable]
    assert len(trainable) == (3 if cls is SVDLinear else 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x_input()).square().sum().backward()
    opt.step()
    for n, p in layer.base.named_parameters():
        assert p.grad is None and torch.equal(p, base_before[n]), n
    assert all(not torch.equal(p, b) for p, b in zip(trainable, adapter_before))


@pytest.mark.parametrize("cls", [LoraLinear, SVDLinear])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_dtypes(cls, kind, base_dtype, adapter_dtype):
    ref = cls(make_base(kind), r=R, alpha=8.0)
    _randomize(ref)
    layer = cls(make_base(kind, dtype=base_dtype), r=R, alpha=8.0, dtype=adapter_dtype)
    with torch.no_grad():
        for (n, p), q in zip(layer.named_parameters(), ref.parameters()):
            p.copy_(q)
    assert {p.dtype for n, p in layer.named_parameters() if not n.startswith("base.")} == {adapter_dtype}
    x = x_input(dtype=base_dtype)
    y = layer(x)
    assert y.dtype == base_dtype and torch.isfinite(y).all()
    # low precision only rounds: the result stays near the fp32 computation
    tol = 1e-6 if base_dtype == adapter_dtype == torch.float32 else 0.1
    torch.testing.assert_close(y.float(), ref(x.float()), rtol=0, atol=tol)
    y.float().square().sum().backward()
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == adapter_dtype and torch.isfinite(g).all() for g in grads)


def test_constructor_errors():
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        LoraLinear(nn.Conv2d(2, 2, 1), r=2, alpha=2)
    for cls in (LoraLinear, SVDLinear):
        with pytest.raises(ValueError, match="rank"):
            cls(nn.Linear(4, 4), r=0, alpha=2)
