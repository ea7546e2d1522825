"""A warning, once, when SVD adapters train with nothing allocating their ranks.

SVD adapters without an allocator train as a plain fixed-rank adapter, and nothing says so: PEFT's
`update_and_allocate` fails this way when a user forgets it (peft#1801, #1327). `inject` puts a forward
pre-hook on every SVD adapter it makes (`watch`); an allocator built over them (`RankAllocator`, which the
runner builds before its loop and `AdaRankCallback` at the start of training) removes the hooks (`attach`).
A training-mode forward that finds the hooks still in place warns once and removes them. After either,
the adapters' forward runs no hook at all.
"""

from __future__ import annotations

import warnings
from typing import Iterable

from torch import nn

__all__ = ["watch", "attach", "MESSAGE"]

MESSAGE = ("adarank: SVD adapters are training but no allocator is attached, so their ranks stay fixed: the "
           "importance scores, the budget schedule and the masking never run. Build a RankAllocator over them and "
           "step it after each optimizer step, or pass adarank.AdaRankCallback(...) to the transformers Trainer")

_ATTR = "_adarank_watch"


class _Watch:
    """The pre-hooks of one `inject` call: the first training-mode forward through any of them warns and
    removes them all. A plain object (not a closure), so models holding it still deep-copy and pickle."""

    def __init__(self) -> None:
        self.hooked: list[tuple[nn.Module, int]] = []  # (adapter, hook id)

    def __call__(self, module: nn.Module, args) -> None:
        if not module.training:  # evaluation needs no allocator
            return
        self.stop()
        warnings.warn(MESSAGE, UserWarning, stacklevel=3)

    def stop(self) -> None:
        for module, key in self.hooked:
            module._forward_pre_hooks.pop(key, None)
            module.__dict__.pop(_ATTR, None)
        self.hooked = []


def watch(layers: Iterable[nn.Module]) -> None:
    """Warn once at the first training-mode forward through `layers` unless `attach` is called first."""
    w = _Watch()
    for layer in layers:
        w.hooked.append((layer, layer.register_forward_pre_hook(w).id))
        layer.__dict__[_ATTR] = w


def attach(layers: Iterable[nn.Module]) -> None:
    """An allocator now drives `layers`: remove their warning hooks."""
    for layer in layers:
        w = layer.__dict__.get(_ATTR)
        if w is not None:
            w.stop()
