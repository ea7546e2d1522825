"""Any budget from one run: the global top-K triplets by their final importance, and the truncation to them.

The allocator's final importance scores (`RankAllocator.final_importance`) order every kept triplet of every
SVD adapter on one scale, so keeping the K best of them is the allocation that run would make at budget K.
This is a truncation of a run trained at its own budget, not a run trained at budget K.

Scores are given per module, one per *live* triplet (λ ≠ 0), in triplet order: exactly the rows of that
module's exported `lora_A` (adarank/export.py exports the λ ≠ 0 triplets, in order).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .inject import svd_adapters

__all__ = ["topk_keep", "topk_ranks", "truncate_adapter", "aligned_scores"]


def topk_keep(scores: Mapping[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """The global top-`budget` keep mask of each module's triplets.

    Ties are broken by position (the module whose name sorts first, then the earlier triplet wins), so the
    same scores always give the same mask, in whatever order the mapping holds them. Raises ValueError for a budget outside [1, number of scored
    triplets] or a score that is not finite.
    """
    names = sorted(scores)
    flat = [scores[n].detach().flatten().float().cpu() for n in names]
    allv = torch.cat(flat) if flat else torch.zeros(0)
    total = allv.numel()
    if isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= total:
        raise ValueError(f"budget: must be an int in [1, {total}] (the run's kept triplets), got {budget!r}")
    if not torch.isfinite(allv).all():
        bad = next(n for n, s in zip(names, flat) if not torch.isfinite(s).all())
        raise ValueError(f"scores: the importance of {bad} is not finite")
    # a stable descending sort keeps equal scores in position order: the earlier triplet is kept
    order = torch.sort(allv, descending=True, stable=True).indices[:budget]
    keep = torch.zeros(total, dtype=torch.bool)
    keep[order] = True
    by_name = dict(zip(names, keep.split([s.numel() for s in flat])))
    return {n: by_name[n] for n in scores}


def topk_ranks(scores: Mapping[str, torch.Tensor], budget: int) -> dict[str, int]:
    """The rank each module keeps in the global top-`budget` (0 where none of its triplets is kept)."""
    return {n: int(k.sum()) for n, k in topk_keep(scores, budget).items()}


def aligned_scores(model: nn.Module, scores: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`scores` for every SVD adapter of `model` (model order), one per live triplet (λ ≠ 0); a module with no
    live triplet may be left out (the saved importance leaves rank-0 modules out). ValueError if they do not fit."""
    layers = dict(svd_adapters(model))
    if not layers:
        raise ValueError("budget: the model has no SVD adapters to truncate (a top-K needs an adalora run)")
    extra = sorted(set(scores) - set(layers))
    if extra:
        raise ValueError(f"scores: {extra[0]} is no SVD adapter of the model")
    out = {}
    for name, layer in layers.items():
        live = int((layer.lam != 0).sum())
        if name not in scores and live:
            raise ValueError(f"scores: no score for {name}")
        out[name] = scores.get(name, torch.zeros(0))
        if out[name].numel() != live:
            raise ValueError(f"scores: {name} has {out[name].numel()} scores for {live} live triplets (λ ≠ 0)")
    return out


@torch.no_grad()
def truncate_adapter(model: nn.Module, scores: Mapping[str, torch.Tensor], budget: int) -> dict[str, int]:
    """Keep only the global top-`budget` triplets of `model`'s SVD adapters, in place: λ of the others is
    set to 0 (export_peft then leaves them out). Returns the rank of every module after the truncation."""
    scores = aligned_scores(model, scores)
    layers = dict(svd_adapters(model))
    keep = topk_keep(scores, budget)
    for name, layer in layers.items():
        live = (layer.lam != 0).nonzero().flatten()
        drop = live[~keep[name].to(live.device)]
        layer.lam[drop] = 0
    return {n: int(k.sum()) for n, k in keep.items()}
