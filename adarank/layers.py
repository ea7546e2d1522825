"""Adapter layers: LoRA (ΔW = B·A) and the SVD-form adapter of AdaLoRA (ΔW = P·diag(λ)·Q).

Both wrap a frozen `nn.Linear` or a transformers `Conv1D` (GPT-2 style, weight stored as (in, out)).
ΔW is always expressed in (out, in) orientation; only merge/unmerge care about the base layout.
With `fused` set, each forward first offers itself to the GPU fast path (`fast.forward`, adarank/fast/, which
documents what it reads of a layer) and computes the plain way where that does not serve.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import fast
from .quant import is_quantized

try:  # transformers is a hard dependency, but keep the layers importable without it
    from transformers.pytorch_utils import Conv1D
except Exception:  # pragma: no cover
    Conv1D = ()  # type: ignore[assignment,misc]

__all__ = ["LoraLinear", "SVDLinear", "is_adaptable", "base_dims"]


def is_adaptable(module: nn.Module) -> bool:
    """True for the module types an adapter can wrap."""
    return isinstance(module, nn.Linear) or (Conv1D != () and isinstance(module, Conv1D))


def base_dims(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    w = base.weight  # Conv1D stores (in, out)
    return w.shape[0], w.shape[1]


def _scale(alpha: float, r: int, rslora: bool) -> float:
    if r == 0:
        return 0.0
    return alpha / math.sqrt(r) if rslora else alpha / r


class _Adapter(nn.Module):
    """Shared plumbing: the frozen base, dropout, dtype handling, merge/unmerge."""

    def __init__(self, base: nn.Module, dropout: float, fused: bool = False) -> None:
        super().__init__()
        if not is_adaptable(base):
            raise TypeError(f"can only wrap nn.Linear or transformers Conv1D, got {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base_dims(base)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # Conv1D computes x @ W with W (in, out): merging must add ΔWᵀ.
        self.transposed = not isinstance(base, nn.Linear)
        #: let the GPU fast path (adarank.fast) compute this layer where it serves: faster on a GPU, equal
        #: up to rounding; a plain attribute, so it can be switched on an injected model
        self.fused = fused

    @property
    def weight(self) -> torch.Tensor:  # some transformers code reads `.weight` of projections
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def _adapter_input(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = self.dropout(x)
        # Under autocast the matmul casts for us; a manual cast would copy the activation twice.
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(dtype)
        return x

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into the base weight (for inference). Lossy when the base is bf16/fp16."""
        if self.merged:
            return
        self._add_delta(1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the base weight again."""
        if not self.merged:
            return
        self._add_delta(-1.0)
        self.merged = False

    def _add_delta(self, sign: float) -> None:
        w = self.base.weight
        if is_quantized(w):
            raise ValueError("merge: the base weight is NF4 (model.quantization=nf4) and adding ΔW would round it "
                             "to 4 bits; export the adapter (export_peft) and merge it into a dense copy of the base")
        delta = self.delta_weight().to(torch.float32)
        if self.transposed:
            delta = delta.T
        w.copy_((w.float() + sign * delta).to(w.dtype))


class LoraLinear(_Adapter):
    """LoRA: y = base(x) + scale · B·A·dropout(x), scale = α/r (or α/√r with rsLoRA).

    Initialised as PEFT does: B = 0, A Kaiming-uniform(a=√5), so the wrapped model starts unchanged.
    """

    kind = "lora"  #: the adapter form, as `inject` names it

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: torch.dtype = torch.float32,
        fused: bool = False,
    ) -> None:
        super().__init__(base, dropout, fused)
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scale = _scale(alpha, r, rslora)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        served = fast.forward(self, x)
        if served is not None:
            return served
        y = self.base(x)
        if self.merged:
            return y
        h = self._adapter_input(x, self.lora_A.dtype)
        # the scale goes into the (out, r) factor: a weight-sized multiply, not a token-sized one
        d = F.linear(F.linear(h, self.lora_A), self.lora_B * self.scale)
        return y + d.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in (out, in) orientation, scale included."""
        return (self.lora_B @ self.lora_A) * self.scale

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:.4g}"


class SVDLinear(_Adapter):
    """AdaLoRA's SVD-form adapter: y = base(x) + P·diag(λ·scale)·Q·dropout(x).

    λ starts at 0 and P, Q at N(0, 0.02), as in the paper. The scale is fixed at α/r_init
    (α/√r_init with rsLoRA) for the whole run: pruning or shrinking ranks never changes it, so
    the function of the kept triplets is unchanged by a shrink.
    """

    kind = "svd"  #: the adapter form, as `inject` names it

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dtype: torch.dtype = torch.float32,
        fused: bool = False,
    ) -> None:
        super().__init__(base, dropout, fused)
        if r < 1:
            raise ValueError(f"SVD adapter initial rank must be >= 1, got {r}")
        self.r_init, self.alpha, self.rslora = r, alpha, rslora
        self.scale = _scale(alpha, r, rslora)
        dev = base.weight.device
        self.P = nn.Parameter(torch.empty(self.out_features, r, device=dev, dtype=dtype))
        self.lam = nn.Parameter(torch.zeros(r, device=dev, dtype=dtype))
        self.Q = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=dtype))
        nn.init.normal_(self.P, mean=0.0, std=0.02)
        nn.init.normal_(self.Q, mean=0.0, std=0.02)
        self._register_load_state_dict_pre_hook(self._take_saved_rank, with_module=False)

    def _take_saved_rank(self, state_dict: dict, prefix: str, *args) -> None:
        """Before `load_state_dict` copies values: a state saved after a shrink holds fewer triplets than this
        layer, so take its rank first (the values themselves come from the state). This lets a fresh model
        load a shrunk checkpoint, as the transformers Trainer does when it resumes (integrations/trainer.py)."""
        lam = state_dict.get(prefix + "lam")
        if lam is not None and lam.dim() == 1 and lam.shape[0] < self.r:
            self.keep(torch.arange(lam.shape[0]))

    @property
    def r(self) -> int:
        """Current physical rank (r_init until a shrink)."""
        return self.lam.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        served = fast.forward(self, x)
        if served is not None:
            return served
        y = self.base(x)
        if self.merged or self.r == 0:
            return y
        h = self._adapter_input(x, self.Q.dtype)
        # λ·scale is folded into Q: a weight-sized (r, in) multiply rather than a token-sized one, so the
        # forward is LoRA's two thin matmuls plus one tiny op.
        d = F.linear(F.linear(h, self.Q * (self.lam * self.scale)[:, None]), self.P)
        return y + d.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in (out, in) orientation, scale included."""
        return (self.P * (self.lam * self.scale)) @ self.Q

    @torch.no_grad()
    def keep(self, idx: torch.Tensor) -> list[tuple[nn.Parameter, nn.Parameter, int, torch.Tensor]]:
        """Physically keep only the triplets `idx`; returns (old, new, dim, idx) per parameter.

        The caller uses the returned tuples to slice optimizer state the same way.
        """
        idx = idx.to(self.lam.device, torch.long)
        out = []
        for name, dim in (("P", 1), ("lam", 0), ("Q", 0)):
            old = getattr(self, name)
            # A module pruned to rank 0 keeps empty parameters that nothing trains (DDP requires every
            # trainable parameter to receive a gradient).
            new = nn.Parameter(old.detach().index_select(dim, idx).clone(), requires_grad=old.requires_grad and idx.numel() > 0)
            setattr(self, name, new)
            out.append((old, new, dim, idx))
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}/{self.r_init}, scale={self.scale:.4g}"
