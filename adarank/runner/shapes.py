"""Batch shapes under `train.compile` and `train.cuda_graph`: what the loop compiles, and what it records.

torch.compile specialises a graph to the shapes it sees. With dynamic padding the width changes every batch:
dynamo compiles a static graph for the first width, then retraces once with the width symbolic ("automatic
dynamic shapes"; torch 2.13 on CPU, measured on the tiny BERT), whose kernels serve every later width. With
`data.length_buckets` the loop instead compiles one static graph per bucket width (`mark_static`), at most
`len(buckets)` in all, each specialised like a fixed-shape model. In both modes a batch with fewer rows than
`train.batch_size` (the last one of an epoch) runs eagerly: one eager step per epoch costs far less than
compiling a graph for its shape (without that, dynamo would retrace with a symbolic batch size). An adalora
shrink changes the adapters' shapes, so each width compiles once more after it.

`results.json` records the counts (`"compile"`): the graphs dynamo compiled during the run (each one a trace and,
with inductor, a code generation: what compiling costs), the recompiles among them (graphs after the first;
reported only when no graph break split the forward, since a graph break makes one forward several graphs),
the graph breaks, and the batches that ran eagerly. They come from `torch._dynamo.utils.counters`, kept since
torch 2.0; the counters are process-wide, so they are read as differences. In one process (a sweep run by
Hydra's basic launcher) a later run reuses the graphs an earlier run compiled for the same shapes, and then
records fewer.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from .data import Batches
from .data.buckets import shapes_of_epoch

__all__ = ["BACKEND", "CompiledForward", "Compiler", "shape_record", "warn_graph_shapes"]

#: torch.compile's backend. The CPU tests count graphs with "eager": dynamo traces the same graphs and
#: guards (with static shapes inductor adds none), without the minutes of C++ code generation.
BACKEND = "inductor"


def _counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


class Compiler:
    """Wraps the loop's module in torch.compile (again after a shrink) and counts what dynamo compiles.

    Args:
        batch_size: rows of a full training batch; batches with fewer rows run eagerly.
        buckets: the training batches' widths (data.length_buckets), or None for dynamic padding.
    """

    def __init__(self, batch_size: int, buckets: Sequence[int] | None) -> None:
        self.batch_size, self.buckets = batch_size, list(buckets) if buckets is not None else None
        self.eager_batches = 0
        self._start = _counts()

    def wrap(self, net: nn.Module) -> "CompiledForward":
        return CompiledForward(net, self)

    def summary(self) -> dict[str, Any]:
        """The counts since this Compiler was made (see the module docstring)."""
        now = _counts()
        graphs, breaks = (now[k] - self._start[k] for k in ("graphs", "graph_breaks"))
        return {"buckets": self.buckets, "graphs": graphs, "recompiles": max(0, graphs - 1) if breaks == 0 else None,
                "graph_breaks": breaks, "eager_batches": self.eager_batches}


class CompiledForward:
    """What the loop calls under train.compile: `net` compiled for full batches, `net` itself for the others."""

    def __init__(self, net: nn.Module, compiler: Compiler) -> None:
        self.net, self.compiler = net, compiler
        self.compiled = torch.compile(net, backend=BACKEND)

    def __call__(self, **batch: torch.Tensor) -> Any:
        if next(iter(batch.values())).shape[0] != self.compiler.batch_size:
            self.compiler.eager_batches += 1
            return self.net(**batch)
        if self.compiler.buckets is not None:
            for t in batch.values():  # one graph per bucket width, never a dynamic one
                torch._dynamo.mark_static(t)
        return self.compiled(**batch)


def shape_record(compiler: Compiler | None, graphs: Any, buckets: Sequence[int] | None) -> dict[str, Any]:
    """results.json's "compile" and "cuda_graph" entries (None for a run without them); a CUDA-graph run's
    captures are one graph per captured micro-batch shape plus the update's (again after a shrink)."""
    return {"compile": compiler.summary() if compiler is not None else None,
            "cuda_graph": {"buckets": buckets, "captures": graphs.captures} if graphs is not None else None}


def warn_graph_shapes(train: Batches, max_shapes: int, log: Callable[[str], None]) -> None:
    """Under train.cuda_graph: say so when an epoch (the loader's current one) has more batch shapes than get captured."""
    shapes = shapes_of_epoch(train.split.lengths.numpy(), train.indices().numpy(), train.batch_size, train.buckets,
                             train.split.input_ids.shape[1])
    if len(shapes) > max_shapes:
        log(f"WARNING: train.cuda_graph: an epoch has {len(shapes)} batch shapes and train.cuda_graph_shapes="
            f"{max_shapes} are captured, the rest run eagerly; data.length_buckets (e.g. pow2) bounds them")
