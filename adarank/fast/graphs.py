"""CUDA-graph replay of the training step (`train.cuda_graph`): one graph launch instead of thousands of
kernel launches per step.

Adapters make a step dispatch-bound: every adapted matrix adds a handful of tiny matmuls and their
backward, each a separate kernel that the host must launch. A CUDA graph records the kernels of a
step once and replays them with one call, so the host no longer sets the pace.

The step has two static halves with a dynamic part between them, so there are two kinds of graph:
- **micro(batch)**: forward and loss under autocast, then backward of loss / grad_accum. One graph
  per distinct batch shape (dynamic padding makes lengths vary), all sharing one memory pool.
- **update()**: the closure the loop passes, e.g. the orthogonal regulariser's gradient, clipping and
  the optimizer step. The optimizer must be capturable (fused AdamW with `capturable=True`) and read
  its learning rate from a device tensor (`bind_lr`), which the loop refreshes after each scheduler
  step (`sync_lr`).

The rank allocator runs eagerly between `update()` and `zero_grads()`: its schedule decides on the host
what each step does. It reads the gradients, which therefore live in buffers that last for the whole
run (never None), are accumulated into by every backward, and are zeroed in place by `zero_grads()`.
Fused adapters (adarank/fast/fused.py) accumulate into them straight from their weight-gradient GEMMs.
After a shrink swaps parameters, `reset()` drops every graph.

The first use of each shape, and the first update, run eagerly: lazy initialisation (cuBLAS handles,
the optimizer's state) must not happen during a capture. The second use captures, then replays.
Numerically a replay is the eager step: the same kernels on the same inputs.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .fused import grads_into_buffers

__all__ = ["GraphedStep", "bind_lr", "sync_lr"]


def bind_lr(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Give every param group a device tensor as its learning rate (a captured optimizer step reads
    the tensor's memory, a float would be baked into the graph); returns the tensors.

    A tensor rate that is not on the parameters' device is replaced: a checkpoint loads it onto the CPU,
    and fused AdamW reads a CPU rate as a scalar at capture time, which would freeze it in the graph."""
    out = []
    for g in opt.param_groups:
        dev = g["params"][0].device if g["params"] else torch.device("cpu")
        lr = g["lr"]
        if torch.is_tensor(lr) and lr.device == dev and lr.dtype == torch.float32:
            t = lr
        else:
            t = torch.tensor(float(lr), dtype=torch.float32, device=dev)
        g["lr"] = t
        out.append(t)
    return out


def sync_lr(opt: torch.optim.Optimizer, lrs: Sequence[torch.Tensor]) -> None:
    """After a scheduler step: write each group's new rate into its bound tensor and re-bind it (some
    torch versions' schedulers fill the tensor in place, others assign a float)."""
    for g, t in zip(opt.param_groups, lrs):
        v = g["lr"]
        if v is not t:
            t.fill_(float(v))
            g["lr"] = t


@dataclass
class _Micro:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # the static input buffers a replay reads
    loss: torch.Tensor  # the static output a replay writes


class GraphedStep:
    """Replays a training step's micro-batches and update as CUDA graphs.

    Args:
        loss_fn: batch dict -> scalar loss (the forward, under autocast with `cache_enabled=False`).
        update_fn: () -> optional tensor; everything between the last backward and the allocator.
        params: the trainable parameters (their gradients become persistent buffers).
        grad_accum: micro-batches per optimizer step (each backward uses loss / grad_accum).
        max_shapes: most batch shapes to capture; batches of further shapes run eagerly.
    """

    def __init__(self, loss_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], update_fn: Callable[[], torch.Tensor | None],
                 params: Sequence[torch.nn.Parameter], grad_accum: int = 1, max_shapes: int = 8) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("train.cuda_graph: CUDA graphs need a CUDA device")
        self.loss_fn, self.update_fn = loss_fn, update_fn
        self.grad_accum, self.max_shapes = grad_accum, max_shapes
        self.captures = 0  # graphs captured so far (for logs and tests)
        self.capture_seconds = 0.0  # wall time spent capturing (the training loop leaves it out of its speed)
        #: why the forward could not be captured (the model does something a graph cannot hold, e.g.
        #: DeBERTa-v2 copies a CPU tensor to the GPU in every forward); micro-batches then run eagerly
        self.capture_error: str | None = None
        self.reset(params)

    def reset(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Drop every graph and rebuild the gradient buffers (after a shrink swapped parameters)."""
        self.params = [p for p in params if p.requires_grad]
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.grads = [p.grad for p in self.params]
        self._micro: dict[tuple, _Micro] = {}
        self._seen: set[tuple] = set()
        self._update: tuple[torch.cuda.CUDAGraph, torch.Tensor | None] | None = None
        self._update_warm = False
        self._pool = torch.cuda.graph_pool_handle()

    @staticmethod
    def _key(batch: dict[str, torch.Tensor]) -> tuple:
        return tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(batch.items()))

    def _eager_micro(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # the gradients live in persistent buffers: fused adapters' GEMMs accumulate into them directly,
        # with no separate add kernel per parameter
        with grads_into_buffers():
            loss = self.loss_fn(batch)
        (loss / self.grad_accum).backward()
        return loss.detach()

    def micro(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward + backward of one micro-batch (already on the device); returns the loss (detached).

        The returned tensor of a replayed shape is that graph's static output: read it (or add it to a
        running sum) before the next micro-batch of the same shape overwrites it."""
        key = self._key(batch)
        g = self._micro.get(key)
        if g is None:
            if key not in self._seen or len(self._micro) >= self.max_shapes or self.capture_error is not None:
                self._seen.add(key)  # warm-up for this shape (or too many shapes, or not capturable): eager
                return self._eager_micro(batch)
            stream = torch.cuda.current_stream()
            try:
                g = self._capture_micro(batch, key)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:  # nothing ran during the failed capture: run this batch eagerly
                # a capture the GPU aborted raises in capture_end, before the capture's side stream is
                # left: go back to the stream the step was using
                torch.cuda.set_stream(stream)
                self.capture_error = str(e).strip().splitlines()[-1]
                warnings.warn(f"GraphedStep: the forward cannot be captured, micro-batches run eagerly: "
                              f"{self.capture_error}", stacklevel=2)
                return self._eager_micro(batch)
        else:
            for k, v in batch.items():
                g.inputs[k].copy_(v, non_blocking=True)
        g.graph.replay()
        return g.loss

    def _capture(self, fn: Callable[[], torch.Tensor | None]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor | None]:
        """Record `fn` into a new graph in the shared pool; returns the graph and fn's (static) output.
        Capture records kernels without running them; the replay that follows does the work."""
        graph = torch.cuda.CUDAGraph()
        t0 = time.perf_counter()
        with torch.cuda.graph(graph, pool=self._pool):
            out = fn()
        self.capture_seconds += time.perf_counter() - t0
        self.captures += 1
        return graph, out

    def _capture_micro(self, batch: dict[str, torch.Tensor], key: tuple) -> _Micro:
        inputs = {k: v.clone() for k, v in batch.items()}
        graph, loss = self._capture(lambda: self._eager_micro(inputs))
        self._micro[key] = g = _Micro(graph, inputs, loss)
        return g

    def update(self) -> torch.Tensor | None:
        """Run `update_fn` (replayed from the second call on); returns its (static) output."""
        if self._update is None:
            if not self._update_warm:
                self._update_warm = True  # e.g. AdamW creates its state at its first step
                return self.update_fn()
            self._update = self._capture(self.update_fn)
        graph, out = self._update
        graph.replay()
        return out

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Zero the gradient buffers in place (after the allocator has read them)."""
        if self.grads:
            torch._foreach_zero_(self.grads)
