"""adarank: adaptive-rank LoRA (AdaLoRA-style) with SVD adapters, importance scores and a budget scheduler.

Public API::

    from adarank import inject, svd_adapters, resolve_budget, make_schedule, RankAllocator, orth_penalty, export_peft

The package has three parts: the algorithm at its top (layers, inject, importance, schedule, allocation,
allocator, orth, shrink, export), the runner in `adarank.runner` (config, builders, data, the loop and its
step unit; `python -m adarank.run`), and the studies in `adarank.studies` (reports and analyses of finished
runs; `python -m adarank.report`, `python -m adarank.analyze`). The GPU fast path is `adarank.fast`.
`adarank.AdaRankCallback` (adarank/integrations/trainer.py) drives the allocator in a transformers Trainer; it is
imported on first use, so `import adarank` does not import the Trainer.
"""

from .allocation import Allocation, Allocator
from .allocator import RankAllocator
from .export import export_peft
from .importance import SCORES
from .inject import ParamReport, adapters, find_targets, inject, param_report, svd_adapters
from .layers import LoraLinear, SVDLinear
from .orth import orth_grad_, orth_penalty
from .schedule import Budget, Schedule, budget_at, make_schedule, resolve_budget
from .topk import topk_keep, truncate_adapter
from .sora import SoraAllocator

__all__ = [
    "AdaRankCallback",
    "Allocation",
    "Allocator",
    "Budget",
    "LoraLinear",
    "ParamReport",
    "RankAllocator",
    "SCORES",
    "SVDLinear",
    "Schedule",
    "SoraAllocator",
    "adapters",
    "budget_at",
    "export_peft",
    "find_targets",
    "inject",
    "make_schedule",
    "orth_grad_",
    "orth_penalty",
    "param_report",
    "resolve_budget",
    "svd_adapters",
    "topk_keep",
    "truncate_adapter",
]



def __getattr__(name: str):
    # lazy: the Trainer pulls in accelerate and more, which the core and the runner never need
    if name == "AdaRankCallback":
        from .integrations.trainer import AdaRankCallback

        return AdaRankCallback
    raise AttributeError(f"module 'adarank' has no attribute {name!r}")
