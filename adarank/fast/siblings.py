"""Fused adapters that read the same input tensor run as one call (layers with `fused` set).

q, k and v of an attention block, and gate and up of a gated MLP, are called one after another on one
tensor. Computed together (`fused.adapted_linears`), their adapters read that tensor once instead of once
each, in the forward and for the A-side gradients, and their input gradients are summed in the base
matmuls' epilogues instead of by separate adds.

Which adapters share an input is learned at run time, not from module names:
- **Candidates** are siblings: adapters under one parent module with the same input width (q, k, v and o
  of one attention; gate and up of one MLP).
- **Observing.** The first forward runs them one by one and records the tensor each one received; when
  every candidate has been called once (or one is called again), those that received the very same tensor
  object form a group (q, k and v; o, called on the attention's output, stays alone).
- **Serving**, from the model's next forward on (a forward pre-hook on the model counts its calls, so a
  forward and its recomputation under gradient checkpointing always compute the same way, and save the
  same tensors). When the first adapter of a group is called, it computes the whole group and keeps the
  others' outputs together with the input they belong to; each sibling then takes its own, if it is
  called on that same tensor.
- **Dissolving.** If a kept output is not taken (a sibling was called on another tensor, or not at all,
  before the group was called again), the grouping is dropped for good and every adapter computes alone.
  The outputs are the same either way: an output nobody took only cost its compute.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .fused import adapted_linears
from .serve import adapter_of, groupable

__all__ = ["ForwardCount", "Siblings", "link_siblings"]


class ForwardCount:
    """A forward pre-hook that counts the model's forward calls (an object, so that a deep copy of the model
    gets its own count)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.n += 1


class _Group:
    """Members (by position among the siblings) that read one tensor, and the outputs of the last group call
    that are not yet taken. Positions, not ids: a deep copy of the model keeps them valid."""

    def __init__(self, positions: Sequence[int]) -> None:
        self.positions = tuple(positions)
        self.input: torch.Tensor | None = None
        self.pending: dict[int, torch.Tensor] = {}  # position -> output


class Siblings:
    """The candidate adapters under one parent with one input width (see the module docstring)."""

    def __init__(self, members: Sequence[nn.Module], clock: ForwardCount) -> None:
        self.members = tuple(members)
        self.clock = clock
        self.groups: list[_Group | None] | None = None  # per member its group, once observed
        self.serve_from = 0  # the model's forward from which the groups serve
        self.dissolved = False
        self._seen: dict[int, torch.Tensor] = {}  # while observing: position -> the input it got

    def group_of(self, member: nn.Module) -> tuple[nn.Module, ...]:
        """The members `member` is grouped with (itself included), or () if none (yet)."""
        g = self.groups[self._pos(member)] if self.groups else None
        return tuple(self.members[i] for i in g.positions) if g is not None else ()

    def output(self, member: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The output of `member` on x computed together with its group, or None: it computes alone. The
        caller (serve.forward) has checked that `member` itself is groupable on x."""
        i = self._pos(member)
        if self.groups is None:
            self._observe(i, x)
            return None
        g = self.groups[i] if self.groups else None
        if g is None or self.clock.n < self.serve_from:
            return None
        if g.input is x and i in g.pending:
            y = g.pending.pop(i)
            if not g.pending:
                g.input = None
            return y
        if g.pending:  # an output of the last group call was never taken: the inputs are not shared
            self.dissolve()
            return None
        members = [self.members[j] for j in g.positions]
        if not all(o is member or groupable(o, x) for o in members):
            return None
        ys = adapted_linears(x, x, [adapter_of(o) for o in members])
        g.pending = {j: y for j, y in zip(g.positions, ys) if j != i}
        g.input = x
        return ys[g.positions.index(i)]

    def dissolve(self) -> None:
        """Every member computes alone from now on (kept outputs are dropped)."""
        self.groups, self.dissolved, self._seen = [], True, {}

    def _pos(self, member: nn.Module) -> int:
        return next(i for i, o in enumerate(self.members) if o is member)

    def _observe(self, i: int, x: torch.Tensor) -> None:
        if i in self._seen:  # a second round has begun: settle on what the first one saw
            self._settle()
            return
        self._seen[i] = x
        if len(self._seen) == len(self.members):
            self._settle()

    def _settle(self) -> None:
        by_input: dict[int, list[int]] = {}
        for i, x in sorted(self._seen.items()):
            by_input.setdefault(id(x), []).append(i)
        self.groups, self.serve_from = [None] * len(self.members), self.clock.n + 1
        for positions in by_input.values():
            if len(positions) > 1:
                g = _Group(positions)
                for i in positions:
                    self.groups[i] = g
        self._seen = {}


def link_siblings(model: nn.Module, adapters: Sequence[tuple[str, nn.Module]]) -> None:
    """Give every adapter (name, module) of `model` its `siblings`: the adapters under the same parent
    module with the same input width, or None when it has none; `model` gets the forward count."""
    clock = ForwardCount()
    model.register_forward_pre_hook(clock)
    by_parent: dict[tuple[str, int], list[nn.Module]] = {}
    for name, layer in adapters:
        by_parent.setdefault((name.rpartition(".")[0], layer.in_features), []).append(layer)
    for layers in by_parent.values():
        siblings = Siblings(layers, clock) if len(layers) > 1 else None
        for layer in layers:
            layer.siblings = siblings
