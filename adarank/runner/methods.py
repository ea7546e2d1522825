"""Builders: turn a MethodConfig into an adapted model and what the loop needs to drive it.

This is where config objects stop; everything below receives flat arguments. Each method is one entry
of `METHODS`: a builder and what the config checks need to know of it. What differs between methods at
run time (an allocator, a regulariser, how the result is saved, the final rank) is in the `Adapted` its
builder returns, so the training loop never asks for a method by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from ..allocation import Allocator
from ..allocator import RankAllocator
from ..atomic import atomic_write_bytes
from ..export import export_peft, save_importance
from ..increlora import IncreLoraAllocator
from ..inject import ParamReport, check_not_trained_in_full, find_targets, inject, param_report, svd_adapters
from ..layers import base_dims
from ..orth import OrthGrad
from ..rank_pattern import load_rank_pattern, resolve_ranks, transform
from ..schedule import Budget, Schedule, make_schedule, resolve_budget
from ..sora import SoraAllocator, init_gates_
from .. import unallocated
from . import eva_init, peft_baselines
from .models import DTYPES

if TYPE_CHECKING:
    from .config import MethodConfig, ModelConfig

__all__ = ["Adapted", "MethodSpec", "METHODS", "apply_method", "build_allocator", "method_budget", "method_targets"]


@dataclass
class Adapted:
    """The model after the method was applied, and what the loop needs to drive it."""

    model: nn.Module
    report: ParamReport
    method: str
    target_total: Optional[int] = None  # final budget in triplets (adaptive methods)
    init_rank: Optional[int] = None
    orth_grad: Optional[Callable[[], torch.Tensor]] = None  # adds the regulariser's gradient; returns R
    targets: list[str] = field(default_factory=list)
    #: builds the allocator once the schedule is known (T comes from the data); None: a fixed-rank method
    make_allocator: Optional[Callable[[Schedule], Allocator]] = None
    #: writes what the run trained into an output dir (`adapter/`, `delta.safetensors`)
    save: Optional[Callable[[str], None]] = None
    #: the final average rank that results.json records (None for full fine-tuning)
    final_rank: Optional[float] = None
    #: a method whose adapters depend on the training data (eva) sets them up here, before the model moves to
    #: the device and the optimizer is built; it completes this Adapted (runner/eva_init.py)
    init_from_data: Optional[Callable[["eva_init.InitData"], None]] = None


@dataclass(frozen=True)
class MethodSpec:
    """One method: its builder, and the facts the config checks need before any model exists."""

    build: Callable[[nn.Module, "MethodConfig", "ModelConfig"], Adapted]
    adaptive: bool = False  # has an allocator; method.r is then the final average rank
    fusable: bool = False  # method.fused applies (our adapter layers)
    adapters: bool = True  # adds adapters to the targets (full fine-tuning trains the targets themselves)
    peft: bool = False  # built by PEFT: needs the peft package and a known model head
    grows: bool = False  # starts at method.init_rank (default 1) and grows to the budget (adaptive methods)
    rank_pattern: bool = False  # method.rank_pattern applies (fixed per-module ranks)


def method_targets(method_cfg: "MethodConfig", model_cfg: "ModelConfig") -> list[str]:
    """The module suffixes to adapt: method.targets, else the model's defaults."""
    return list(method_cfg.targets) if method_cfg.targets is not None else list(model_cfg.targets)


@contextlib.contextmanager
def _fields(renames: dict[str, str]):
    """Library errors name the library's parameters in config terms of their own; where the value came from
    another config field, say that field instead (`{"method.targets": "model.targets"}`)."""
    try:
        yield
    except ValueError as e:
        msg = str(e)
        for old, new in renames.items():
            if msg.startswith(old + ":"):
                raise ValueError(new + msg[len(old):]) from None
        raise


def target_names(model: nn.Module, method_cfg: "MethodConfig", model_cfg: "ModelConfig") -> list[str]:
    """The full names of the modules to adapt; an error names model.targets when the suffixes came from there."""
    renames = {} if method_cfg.targets is not None else {"method.targets": "model.targets"}
    with _fields(renames):
        return find_targets(model, method_targets(method_cfg, model_cfg), method_cfg.target_regex)


def apply_method(model: nn.Module, method_cfg: "MethodConfig", model_cfg: "ModelConfig") -> Adapted:
    """Wrap/freeze `model` according to the method. Raises ValueError naming the field on bad input."""
    return METHODS[method_cfg.name].build(model, method_cfg, model_cfg)


def build_allocator(adapted: Adapted, method_cfg: "MethodConfig", total_steps: int) -> Allocator | None:
    """The allocator of an adaptive method (None otherwise), with the schedule's phases resolved from T."""
    if adapted.make_allocator is None:
        return None
    return adapted.make_allocator(make_schedule(total_steps, method_cfg.init_frac, method_cfg.final_frac, method_cfg.delta_t))


def _explicit_target(method_cfg: "MethodConfig") -> bool:
    return method_cfg.target_total_rank is not None or method_cfg.target_params is not None


def method_budget(model: nn.Module, method_cfg: "MethodConfig", names: list[str]) -> Budget:
    """The adaptive methods' initial rank and budgets for the adapted modules `names` of `model`."""
    m = method_cfg
    shapes = [base_dims(model.get_submodule(n)) for n in names]
    if METHODS[m.name].grows:
        return growth_budget(model, m, names)
    try:
        return resolve_budget(shapes, None if _explicit_target(m) else m.r, m.target_total_rank, m.target_params, m.init_rank, m.init_ratio)
    except ValueError as e:
        # a budget that resolves to no triplet at all is the fault of the field that set it
        given = "method.target_params" if m.target_params is not None else "method.target_total_rank"
        if _explicit_target(m) and "resolves to" in str(e):
            raise ValueError(given + str(e).removeprefix("method.r")) from None
        raise


def growth_budget(model: nn.Module, method_cfg: "MethodConfig", names: list[str]) -> Budget:
    """A growing method's budget: the final one as adalora resolves it, the starting rank method.init_rank (1)."""
    m = method_cfg
    final = method_budget(model, dataclasses.replace(m, name="adalora", init_rank=None, init_ratio=1.0), names)
    start = m.init_rank if m.init_rank is not None else 1
    if start * len(names) > final.target_total:
        raise ValueError(f"method.init_rank: {start} x {len(names)} modules exceeds the budget of "
                         f"{final.target_total} triplets; a growing method starts below it")
    return Budget(init_rank=start, init_total=start * len(names), target_total=final.target_total)


def final_average_rank(target_total: int, n_modules: int) -> float:
    """The final budget as an average rank per module: an int when it is whole."""
    avg = target_total / n_modules
    return int(avg) if avg == int(avg) else round(avg, 3)


def _save_export(model: nn.Module, model_cfg: "ModelConfig",
                 importance: Callable[[], dict[str, torch.Tensor] | None] = lambda: None) -> Callable[[str], None]:
    """Writes `adapter/` in PEFT's LoRA format, naming the base model and the task type so that
    `AutoPeftModel*.from_pretrained(adapter_dir)` finds them (no base for a random or GGUF model: nothing could
    load those by path), and the final importance scores beside it where `importance()` has them."""
    from .models import resolve_path

    name = model_cfg.name_or_path
    path = None if name in ("random", "smollm2") else resolve_path(name)
    base = os.path.abspath(path) if path is not None and os.path.isdir(path) else path  # a hub id stays an id
    try:
        task_type = peft_baselines.peft_task_type(model)
    except ValueError:  # a model of another class: PEFT's plain PeftModel
        task_type = None

    def save(out_dir: str) -> None:
        adapter_dir = os.path.join(out_dir, "adapter")
        export_peft(model, adapter_dir, base_model_name_or_path=base, modules_to_save=list(model_cfg.train_modules),
                    task_type=task_type)
        scores = importance()
        if scores is not None:  # a top-K truncation of the run (adarank.export_topk) reads them
            save_importance(adapter_dir, scores)

    return save


# ---- the builders ----------------------------------------------------------------------------------
def build_full(model: nn.Module, method_cfg: "MethodConfig", model_cfg: "ModelConfig") -> Adapted:
    """Full fine-tuning: everything trains; ΔW of the adapter targets is saved for the spectrum analysis."""
    names = target_names(model, method_cfg, model_cfg)
    for p in model.parameters():
        p.requires_grad_(True)
    initial = {n: model.get_submodule(n).weight.detach().float().cpu().clone() for n in names}
    return Adapted(model, param_report(model), "full", targets=names, save=lambda out_dir: save_delta(model, initial, out_dir))


def save_delta(model: nn.Module, initial: dict[str, torch.Tensor], out_dir: str) -> None:
    """`delta.safetensors`: ΔW = W_end − W_start of the given weights (`adarank.analyze` reads it)."""
    from safetensors.torch import save

    delta = {n: (model.get_submodule(n).weight.detach().float().cpu() - w0).contiguous() for n, w0 in initial.items()}
    atomic_write_bytes(os.path.join(out_dir, "delta.safetensors"), save(delta))


def build_lora(model: nn.Module, method_cfg: "MethodConfig", model_cfg: "ModelConfig", rslora: bool = False) -> Adapted:
    """LoRA: fixed rank method.r everywhere, scale α/r (α/√r with `method.rslora` or `rslora`)."""
    m, targets = method_cfg, method_targets(method_cfg, model_cfg)
    names = target_names(model, m, model_cfg)
    train_modules = list(model_cfg.train_modules)
    ranks = lora_ranks(m, names)
    rep = inject(model, "lora", m.r, m.alpha, targets, m.target_regex, m.dropout, m.rslora or rslora, train_modules,
                 DTYPES[m.adapter_dtype], m.fused, ranks)
    final = m.r if ranks is None else final_average_rank(sum(ranks.values()), len(names))
    return Adapted(model, rep, m.name, targets=names, save=_save_export(model, model_cfg), final_rank=final)


def lora_ranks(method_cfg: "MethodConfig", names: list[str]) -> dict[str, int] | None:
    """The per-module ranks of method.rank_pattern (after its control transform), None without one (lora,
    rslora and svd read it)."""
    m = method_cfg
    if m.rank_pattern is None:
        return None
    pattern = resolve_ranks(names, load_rank_pattern(m.rank_pattern))
    ranks = transform(pattern, m.rank_pattern_transform, m.rank_pattern_seed, m.rank_pattern_within)
    if not any(ranks.values()):
        raise ValueError(f"method.rank_pattern: every module is at rank 0 in {m.rank_pattern}")
    return ranks


def build_rslora(model: nn.Module, method_cfg: "MethodConfig", model_cfg: "ModelConfig") -> Adapted:
    """rsLoRA: LoRA with the scale α/√r."""
    return build_lora(model, method_cfg, model_cfg, rslora=True)


def svd_parts(model: nn.Module, method_cfg: "MethodConfig", model_cfg: "ModelConfig", rank: int,
              ranks: dict[str, int] | None = None) -> tuple[ParamReport, Optional[OrthGrad]]:
    """adalora's parameterisation: SVD adapters P·diag(λ)·Q at `rank` (or the per-module `ranks`, 0 leaving a
    module unadapted), scale α/r, and the orthogonal regulariser (None at method.orth_weight=0)."""
    m = method_cfg
    rep = inject(model, "svd", rank, m.alpha, method_targets(m, model_cfg), m.target_regex, m.dropout, m.rslora,
                 list(model_cfg.train_modules), DTYPES[m.adapter_dtype], m.fused, ranks)
    layers = [layer for _, layer in svd_adapters(model)]
    return rep, (OrthGrad(layers, m.orth_weight, m.orth_form) if m.orth_weight > 0 else None)


def build_adalora(model: nn.Module, method_cfg: "MethodConfig", model_cfg: "ModelConfig") -> Adapted:
    """Ours: SVD adapters at the initial rank, the orthogonal regulariser, `RankAllocator` (shrinking at the
    final budget with `method.shrink`); the final importance scores are saved beside the adapter."""
    m = method_cfg
    names = target_names(model, m, model_cfg)
    budget = method_budget(model, m, names)
    rep, reg = svd_parts(model, m, model_cfg, budget.init_rank)
    built: list[RankAllocator] = []  # the allocator this run made (a replaced make_allocator makes none)

    def make_allocator(schedule: Schedule) -> RankAllocator:
        built.append(RankAllocator(svd_adapters(model), schedule, budget.target_total, m.beta1, m.beta2, m.score,
                                   shrink_at_final=m.shrink))
        return built[-1]

    importance = lambda: built[-1].final_importance() if built else None  # noqa: E731
    return Adapted(model, rep, m.name, budget.target_total, budget.init_rank, reg, names, make_allocator,
                   _save_export(model, model_cfg, importance), final_average_rank(budget.target_total, len(names)))


def build_svd(model: nn.Module, method_cfg: "MethodConfig", model_cfg: "ModelConfig") -> Adapted:
    """The SVD adapter without pruning: adalora's parameterisation and regulariser at rank method.r (or
    method.rank_pattern) everywhere, no allocation. A control for what the allocation adds."""
    m = method_cfg
    names = target_names(model, m, model_cfg)
    ranks = lora_ranks(m, names)
    rep, reg = svd_parts(model, m, model_cfg, m.r, ranks)
    unallocated.attach(layer for _, layer in svd_adapters(model))  # fixed ranks on purpose: no warning
    final = m.r if ranks is None else final_average_rank(sum(ranks.values()), len(names))
    return Adapted(model, rep, m.name, orth_grad=reg, targets=names, save=_save_export(model, model_cfg), final_rank=final)


def build_increlora(model: nn.Module, method_cfg: "MethodConfig", model_cfg: "ModelConfig") -> Adapted:
    """IncreLoRA: SVD adapters at method.init_rank (1 by default) growing to the budget adalora would resolve
    (`IncreLoraAllocator`), with the orthogonal regulariser."""
    m = method_cfg
    names = target_names(model, m, model_cfg)
    budget = method_budget(model, m, names)
    rep, reg = svd_parts(model, m, model_cfg, budget.init_rank)
    seed = torch.initial_seed()  # the run's seed (set before the model was built): the new triplets' draws

    def make_allocator(schedule: Schedule) -> IncreLoraAllocator:
        return IncreLoraAllocator(svd_adapters(model), schedule, budget.target_total, m.top_h, m.grow_by, m.beta1,
                                  m.beta2, seed=seed)

    return Adapted(model, rep, m.name, budget.target_total, budget.init_rank, reg, names, make_allocator,
                   _save_export(model, model_cfg), final_average_rank(budget.target_total, len(names)))


def build_sora(model: nn.Module, method_cfg: "MethodConfig", model_cfg: "ModelConfig", targeted: bool = True) -> Adapted:
    """SoRA: adalora's SVD adapters (budget, shrink, orth regulariser if method.orth_weight > 0) whose λ are gates
    made sparse by a proximal L1 step (`adarank.sora`). `sora` tunes ξ to land on adalora's final budget;
    `sora_fixed` keeps ξ (the paper's), and its final rank is where the gates land."""
    m = method_cfg
    adapted = build_adalora(model, m, model_cfg)
    init_gates_([layer for _, layer in svd_adapters(adapted.model)], m.sora_gate_init)
    if not targeted:
        adapted.final_rank = None  # known once the final mask is fixed

    def on_final(kept: int) -> None:
        adapted.final_rank = final_average_rank(kept, len(adapted.targets))

    adapted.make_allocator = lambda schedule: SoraAllocator(
        svd_adapters(adapted.model), schedule, adapted.target_total, m.sora_xi, targeted, m.sora_xi_growth,
        shrink_at_final=m.shrink, on_final=None if targeted else on_final)
    return adapted


def build_sora_fixed(model: nn.Module, method_cfg: "MethodConfig", model_cfg: "ModelConfig") -> Adapted:
    """SoRA with a fixed ξ, as in the paper."""
    return build_sora(model, method_cfg, model_cfg, targeted=False)


def build_peft_lora(model: nn.Module, method_cfg: "MethodConfig", model_cfg: "ModelConfig") -> Adapted:
    """PEFT's own LoRA, in our loop."""
    m = method_cfg
    names = target_names(model, m, model_cfg)
    check_not_trained_in_full(model, names, method_targets(m, model_cfg), model_cfg.train_modules)
    peft_model, report = peft_baselines.peft_lora(model, names, m.r, m.alpha, m.dropout, m.rslora, list(model_cfg.train_modules))
    return Adapted(peft_model, report, m.name, targets=names, save=peft_baselines.save_adapter(peft_model), final_rank=m.r)


def build_peft_adalora(model: nn.Module, method_cfg: "MethodConfig", model_cfg: "ModelConfig") -> Adapted:
    """PEFT's own AdaLoRA, in our loop: the budget as ours resolves it, PEFT's `update_and_allocate` behind
    the Allocator contract."""
    m = method_cfg
    names = target_names(model, m, model_cfg)
    check_not_trained_in_full(model, names, method_targets(m, model_cfg), model_cfg.train_modules)
    budget = method_budget(model, m, names)
    target_rank = budget.target_total // len(names)
    peft_model, report = peft_baselines.peft_adalora(
        model, names, budget.init_rank, target_rank, m.alpha, m.dropout, m.delta_t, m.beta1, m.beta2, m.orth_weight,
        list(model_cfg.train_modules))
    target_total = target_rank * len(names)
    return Adapted(peft_model, report, m.name, target_total, budget.init_rank, None, names,
                   lambda schedule: peft_baselines.PeftAllocator(peft_model, schedule),
                   peft_baselines.save_adapter(peft_model), final_average_rank(target_total, len(names)))


def build_eva(model: nn.Module, method_cfg: "MethodConfig", model_cfg: "ModelConfig") -> Adapted:
    """EVA (Paischer et al. 2024): LoRA whose ranks (N·r in all, at most ρ·r each) and A come from an SVD of the
    targets' inputs on training batches, computed before training by `init_from_data` (runner/eva_init.py)."""
    m, targets = method_cfg, method_targets(method_cfg, model_cfg)
    names = target_names(model, m, model_cfg)
    train_modules = list(model_cfg.train_modules)
    check_not_trained_in_full(model, names, targets, train_modules)

    def inject_lora(ranks: dict[str, int]) -> ParamReport:
        return inject(model, "lora", m.r, m.alpha, targets, m.target_regex, m.dropout, m.rslora, train_modules,
                      DTYPES[m.adapter_dtype], m.fused, ranks)

    adapted = Adapted(model, param_report(model), m.name, targets=names, save=_save_export(model, model_cfg),
                      final_rank=m.r)
    adapted.init_from_data = eva_init.initializer(adapted, inject_lora, m.r, m.alpha, m.rslora, m.eva)
    return adapted


#: Every method the runner knows; `method.name` picks one. A new method is one entry here and one YAML file
#: in conf/method/ (README: "Adding an allocation method").
METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec(build_full, adapters=False),
    "lora": MethodSpec(build_lora, fusable=True, rank_pattern=True),
    "rslora": MethodSpec(build_rslora, fusable=True, rank_pattern=True),
    "adalora": MethodSpec(build_adalora, adaptive=True, fusable=True),
    "increlora": MethodSpec(build_increlora, adaptive=True, fusable=True, grows=True),
    "svd": MethodSpec(build_svd, fusable=True, rank_pattern=True),
    "peft_lora": MethodSpec(build_peft_lora, peft=True),
    "peft_adalora": MethodSpec(build_peft_adalora, adaptive=True, peft=True),
    "eva": MethodSpec(build_eva, fusable=True),
    "sora": MethodSpec(build_sora, adaptive=True, fusable=True),
    "sora_fixed": MethodSpec(build_sora_fixed, adaptive=True, fusable=True),
}
