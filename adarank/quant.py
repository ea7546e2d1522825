"""A 4-bit base, QLoRA-style: the frozen linear layers' weights stored in NF4, the adapters in their own dtype.

The library is torchao's `NF4Tensor` (what torchtune's QLoRA uses): pure PyTorch, so it runs and is tested on
a CPU, and its wheel is 3.4 MB with no dependencies (bitsandbytes' is far over the 64 MiB a GPU job receives).
An NF4 weight stays an `nn.Linear`'s parameter; `F.linear` on it dispatches to torchao's `LinearNF4`, which
dequantises the weight for the matmul and again in backward, and saves only the 4-bit weight for backward.
So an adapter wraps the quantized `nn.Linear` like any other: LoRA and SVD adapters, masks, shrink and export
read only their own factors. Two things read the base weight itself and do not serve an NF4 base:
- merging (`_Adapter.merge`) is refused: adding ΔW into a 4-bit weight would round it away;
- the fused fast path (adarank/fast/) steps aside: its GEMMs read the dense weight directly, and feeding
  them a dequantised copy would hold that dense copy for backward, which is what NF4 saves.

Quantization follows QLoRA: blocks of 64 weights with an absmax each, the absmaxes quantised to 8 bits in
blocks of 256 ("double quantisation"). torchao needs the number of blocks to be a multiple of the second
block size, so a matrix with fewer (or an odd count) uses the largest power-of-two divisor of its block count
up to 256 (SmolLM2's 576×576 projections: 64). A matrix whose size is not a multiple of 64 stays dense.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

__all__ = ["QUANTIZATIONS", "BLOCK", "SCALER_BLOCK", "QuantReport", "check_available", "dense", "is_quantized",
           "quantize_nf4_", "nbytes"]

QUANTIZATIONS = ("none", "nf4")
BLOCK = 64  #: weights per absmax block (QLoRA's)
SCALER_BLOCK = 256  #: absmaxes per double-quantisation block (QLoRA's), or the largest power of two dividing the count


class _SkipCppExtensionNotes(logging.Filter):
    """Drops torchao's import-time notes about its own C++ extensions ("Failed to load …/_C….so", "Skipping
    import of cpp extensions …"): they are built for one torch version and Python ABI, and NF4 is pure PyTorch
    and uses none of them. Every other torchao record passes. Installed when adarank is imported, so it is in
    place whichever library (peft, transformers, ours) imports torchao first; without it, every run of a
    machine with torchao installed writes these lines to stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("Skipping import of cpp extensions")
                    or (msg.startswith("Failed to load ") and "torchao" in msg and "_C" in msg))


logging.getLogger("torchao").addFilter(_SkipCppExtensionNotes())


def check_available(field_name: str = "model.quantization") -> None:
    """Raise a one-line error naming the field when torchao is not installed (the runner's preflight calls it
    before any model loads; a ValueError, as every bad-input error of the runner is)."""
    if importlib.util.find_spec("torchao") is None:
        raise ValueError(f"{field_name}: nf4 needs torchao (pip install 'adarank[quant]', or pip install torchao)")


def is_quantized(t: torch.Tensor | None) -> bool:
    """True for a torchao NF4 weight. Never imports torchao: a weight can only be NF4 once it has been imported.
    Matched by class name and package, so it holds where torchao moves the class between releases."""
    if "torchao" not in sys.modules or t is None:
        return False
    return any(c.__name__ == "NF4Tensor" and c.__module__.startswith("torchao.") for c in type(t).__mro__)


def dense(weight: torch.Tensor) -> torch.Tensor:
    """The weight as a plain tensor of its dtype: an NF4 weight dequantised, any other as it is. For code that
    reads a base weight's values (norms, say); NF4 supports little beyond the linear and moving devices."""
    return weight.get_original_weight() if is_quantized(weight) else weight


def _to_nf4():
    check_available()
    from torchao.quantization import to_nf4

    return to_nf4


def nbytes(t: torch.Tensor) -> int:
    """Bytes a weight occupies: an NF4 weight's packed codes, scalers and tables, else the dense storage."""
    if is_quantized(t):
        names, _ = t.__tensor_flatten__()
        return sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
    return t.numel() * t.element_size()


@dataclass
class QuantReport:
    """What `quantize_nf4_` did: the quantized and the left-dense linear layers, and their weights' bytes."""

    quantized: list[str] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)  # linear layers left as they were (size not a multiple of 64)
    bytes_before: int = 0
    bytes_after: int = 0

    def summary(self) -> str:
        mib = 2**20
        return (f"model.quantization=nf4: {len(self.quantized)} linear layers in NF4, weights "
                f"{self.bytes_before / mib:.1f} -> {self.bytes_after / mib:.1f} MiB"
                + (f"; left dense (size not a multiple of {BLOCK}): {', '.join(self.dense)}" if self.dense else ""))


def _scaler_block(n_blocks: int) -> int:
    """The largest power of two dividing `n_blocks`, at most SCALER_BLOCK (torchao needs it to divide)."""
    return math.gcd(n_blocks, SCALER_BLOCK)


def _skipped(model: nn.Module, keep_dense: Sequence[str]) -> set[str]:
    """Names of modules that stay dense: those under `keep_dense` suffixes (trained in full) and the output
    embedding (often tied to the input embedding, and not a frozen projection in QLoRA either)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set()
    owners = [n for n, _ in model.named_modules() if n and any(n == s or n.endswith("." + s) for s in keep_dense)]
    for name, module in model.named_modules():
        if module is out_emb or any(name == o or name.startswith(o + ".") for o in owners):
            names.add(name)
    return names


@torch.no_grad()
def quantize_nf4_(model: nn.Module, keep_dense: Sequence[str] = (), device: torch.device | str | None = None) -> QuantReport:
    """Store the weight of every `nn.Linear` of `model` in NF4 (frozen), in place, on `device` (default: where
    it is); the rest of the model is left where it is. Modules under a `keep_dense` suffix (those trained in full,
    e.g. a classifier head) and the output embedding stay dense. Each weight is quantised from its own dtype
    and dequantises back to it. Call before `inject`: adapters then wrap the quantized layers."""
    to_nf4 = _to_nf4()
    skip = _skipped(model, keep_dense)
    rep = QuantReport()
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or name in skip or is_quantized(module.weight):
            continue
        w = module.weight
        if w.numel() % BLOCK:
            rep.dense.append(name)
            continue
        rep.bytes_before += nbytes(w)
        dense = w.detach().to(device or w.device).contiguous()
        q = to_nf4(dense, BLOCK, _scaler_block(dense.numel() // BLOCK))
        module.weight = nn.Parameter(q, requires_grad=False)
        if module.bias is not None and device is not None:
            module.bias = nn.Parameter(module.bias.detach().to(device), requires_grad=module.bias.requires_grad)
        rep.bytes_after += nbytes(module.weight)
        rep.quantized.append(name)
    return rep
