"""adarank: adaptive-rank LoRA (AdaLoRA-style) with SVD adapters, importance scores and a budget scheduler.

Public API::

    from adarank import inject, svd_adapters, resolve_budget, make_schedule, RankAllocator, orth_penalty, export_peft
"""

from .allocator import Allocation, RankAllocator
from .export import export_peft
from .importance import SCORES
from .inject import ParamReport, adapters, find_targets, inject, param_report, svd_adapters
from .layers import LoraLinear, SVDLinear
from .orth import orth_grad_, orth_penalty
from .schedule import Budget, Schedule, budget_at, make_schedule, resolve_budget

__all__ = [
    "Allocation",
    "Budget",
    "LoraLinear",
    "ParamReport",
    "RankAllocator",
    "SCORES",
    "SVDLinear",
    "Schedule",
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
]

