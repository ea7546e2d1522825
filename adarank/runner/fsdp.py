"""FSDP2 under torchrun (train.distributed=fsdp): the frozen base sharded, what trains replicated.

How the work is split, and why:

* **The frozen base is sharded.** `fully_shard` (FSDP2) goes on every transformer block (each child of the
  model's `nn.ModuleList`s) and then on the root (embeddings, norms). Each rank stores 1/world of those weights;
  a block's are all-gathered for its forward, freed, and all-gathered again for its backward (the gradient must
  flow through the frozen weights to the adapters below). This is where the memory goes for a large base.
* **What trains is replicated.** Every parameter with `requires_grad` (the adapters' P, λ, Q or LoRA's A, B, the
  head, `train_modules`) is in `ignored_params`: FSDP2 neither shards it nor reduces its gradient. After the
  last micro-batch of a step `average_grads` all-reduces those gradients in one flat buffer and divides by the
  world size, as DDP does. So the allocator's importance scores, the orthogonal regulariser, clipping and the
  shrink all see ordinary full tensors holding the same averaged gradients on every rank: the masks are
  identical by construction (`train.check_masks=true` verifies it with a collective), and no per-triplet score
  needs gathering. Adapters are a tiny fraction of the weights, so replicating them costs little memory.
* **Shrink is supported** (not just masking): the allocator replaces P, λ, Q with smaller ordinary
  parameters; FSDP2 never managed them, so nothing is resharded and the model is not wrapped again.
* **Checkpoints stay the single-file ring of checkpoint.py, written by rank 0.** Everything a checkpoint holds
  (the trainable weights, their optimizer state, the allocator) is replicated, hence complete on rank 0, and
  the frozen base is rebuilt from its source on resume in every mode, so there is no sharded tensor to save;
  `torch.distributed.checkpoint` would add a directory format and a second resume path for nothing.
* **Export** runs on rank 0 from the replicated adapters and head, as under DDP: nothing to gather.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .distributed import DistInfo

__all__ = ["shard", "average_grads", "ReplicatedGrads"]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the children of every `nn.ModuleList` that hold a frozen weight."""
    return [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m
            if any(not p.requires_grad for p in block.parameters())]


def shard(model: nn.Module) -> nn.Module:
    """`fully_shard` every block, then the root, leaving out every parameter that trains (in place; returns
    `model`, now also an `FSDPModule`). Calling it again on a sharded model changes nothing (after a shrink)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    trains = {p for p in model.parameters() if p.requires_grad}
    for block in blocks(model):
        fully_shard(block, ignored_params=trains)
    fully_shard(model, ignored_params=trains)
    return model


@torch.no_grad()
def average_grads(params: list[nn.Parameter], info: DistInfo) -> None:
    """Replace each gradient with its mean over the ranks: one all-reduce of one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    if not info.enabled or not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= info.world_size
    for g, mean in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(mean)


class ReplicatedGrads:
    """What the loop's `no_sync` asks of under FSDP: nothing is reduced during backward (the gradients of what
    trains are averaged once per step by `average_grads`), so every micro-batch runs as is."""

    def no_sync(self):
        return contextlib.nullcontext()
