"""Whether the fast path serves an adapter layer's forward, and the call that serves it.

The layer side of the contract (the attributes read here) is described in adarank/fast/__init__.py.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant import is_quantized
from . import ops
from .fused import Adapter, adapted_linear

__all__ = ["adapter_of", "forward", "groupable"]


def forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """`layer(x)` computed by the fast path, or None where it does not serve: then the layer's own (plain)
    path computes it. It serves a layer that is `fused`, not merged and `_fusable` on x: together with the
    layer's siblings when they share x (and no dropout is at work), else alone. A rank-0 SVD adapter is
    served too: the fused function computes its base alone, and it may stay in its group."""
    if not (layer.fused and not layer.merged and _fusable(layer, x)):
        return None
    if torch.compiler.is_compiling():  # the compiler keeps the fused layer as an opaque op (adarank/fast/ops.py)
        return ops.adapted_linears(x, layer.dropout(x), (adapter_of(layer),))[0]
    siblings = getattr(layer, "siblings", None)  # set by link_siblings; absent on a layer built by hand
    if siblings is not None and _dropout_idle(layer):
        y = siblings.output(layer, x)
        if y is not None:
            return y
    return adapted_linear(x, layer.dropout(x), *adapter_of(layer))


def groupable(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer` can be computed in a group call on x: fused, unmerged, fusable, and with no dropout at
    work."""
    return layer.fused and not layer.merged and _fusable(layer, x) and _dropout_idle(layer)


def adapter_of(layer: nn.Module) -> Adapter:
    """The layer's frozen base and factors as `fused.adapted_linears` takes them."""
    base = layer.base
    if layer.kind == "lora":
        return Adapter(base.weight, base.bias, "lora", layer.lora_A, layer.lora_B, None, layer.scale, layer.transposed)
    if layer.kind == "svd":
        return Adapter(base.weight, base.bias, "svd", layer.Q, layer.P, layer.lam, layer.scale, layer.transposed)
    raise ValueError(f"fast path: unknown adapter kind {layer.kind!r}")


def _factor_dtype(layer: nn.Module) -> torch.dtype:
    """The adapter's parameters' dtype (the unfused path computes the adapter in it)."""
    return (layer.lora_A if layer.kind == "lora" else layer.Q).dtype


def _fusable(layer: nn.Module, x: torch.Tensor) -> bool:
    """The fused path returns no gradient for the base, so it serves only while the base is frozen;
    and it computes in one dtype, so without autocast only when the input has the adapter's dtype
    (the unfused path computes the adapter in its own dtype, e.g. fp32 next to a bf16 base).
    An NF4 base (adarank/quant.py) takes the unfused path: the fused
    GEMMs read the dense weight, and a dequantised copy would be held for backward, which is what NF4 saves."""
    b, w = layer.base.bias, layer.base.weight
    if w.requires_grad or (b is not None and b.requires_grad) or is_quantized(w):
        return False
    return x.dtype == _factor_dtype(layer) or torch.is_autocast_enabled(x.device.type)


def _dropout_idle(layer: nn.Module) -> bool:
    """No dropout at work: a group shares one input, while dropout draws a mask per adapter."""
    return isinstance(layer.dropout, nn.Identity) or not layer.training
