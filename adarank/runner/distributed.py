"""Data-parallel training with torch.distributed (launched by torchrun): setup and the mask check.

Under DDP the gradients are averaged before the optimizer step, so every rank feeds the allocator the same
gradients and parameters and computes the same masks. `check_equal` verifies that (a debug mode), and
rank 0 alone logs and writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "teardown", "check_equal", "barrier", "gather_objects", "mean_over_ranks", "from_main"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_type: str) -> DistInfo:
    """Join the process group torchrun describes in the environment (a no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def check_equal(info: DistInfo, tensor: torch.Tensor, what: str) -> None:
    """Raise if `tensor` differs between ranks (gathers it everywhere: a debug check, not for every step)."""
    if not info.enabled:
        return
    x = tensor.detach().to(torch.float64).flatten()
    if dist.get_backend() == "nccl":
        x = x.cuda()
    parts = [torch.empty_like(x) for _ in range(info.world_size)]
    dist.all_gather(parts, x)
    for r, p in enumerate(parts):
        if not torch.equal(p, parts[0]):
            raise RuntimeError(f"{what} differs between rank 0 and rank {r}: the ranks diverged")


def gather_objects(info: DistInfo, obj):
    """Every rank's `obj` as a list on every rank (just [obj] for a single process)."""
    if not info.enabled:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(info: DistInfo, x: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over ranks (for logging the loss every rank saw)."""
    if not info.enabled:
        return x
    y = x.detach().clone().float()
    dist.all_reduce(y)
    return y / info.world_size


def from_main(info: DistInfo, compute):
    """`compute()` on rank 0 alone, its result (any picklable object) on every rank; a ValueError it raises is
    raised on every rank (no rank is left waiting for a result that will not come)."""
    if not info.enabled:
        return compute()
    box = [None]
    if info.is_main:
        try:
            box = [(True, compute())]
        except ValueError as e:
            box = [(False, str(e))]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise ValueError(value)
    return value
