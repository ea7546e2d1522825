"""Builders: turn a MethodConfig into an adapted model, an allocator and a regulariser.

This is where config objects stop; everything below receives flat arguments. PEFT's own LoRA and
AdaLoRA are built here too, so every method runs inside the same training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..allocator import Allocation, RankAllocator
from .config import MethodConfig, ModelConfig
from ..inject import ParamReport, find_targets, inject, param_report, svd_adapters
from ..layers import base_dims
from .models import DTYPES
from ..orth import OrthGrad
from ..schedule import Budget, Schedule, make_schedule, resolve_budget

__all__ = ["Adapted", "apply_method", "build_allocator", "method_budget", "method_targets", "PeftAllocator", "peft_task_type"]


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


def method_targets(m: MethodConfig, mc: ModelConfig) -> list[str]:
    """The module suffixes to adapt: method.targets, else the model's defaults."""
    return list(m.targets) if m.targets is not None else list(mc.targets)


def apply_method(model: nn.Module, m: MethodConfig, mc: ModelConfig) -> Adapted:
    """Wrap/freeze `model` according to the method. Raises ValueError naming the field on bad input."""
    targets = method_targets(m, mc)
    train_modules = list(mc.train_modules)
    dtype = DTYPES[m.adapter_dtype]
    names = find_targets(model, targets, m.target_regex)
    if m.name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        # the targets still matter: their ΔW is saved for the spectrum analysis
        return Adapted(model, param_report(model), "full", targets=names)
    if m.name in ("lora", "rslora"):
        rep = inject(model, "lora", m.r, m.alpha, targets, m.target_regex, m.dropout, m.rslora or m.name == "rslora", train_modules, dtype,
                     m.fused)
        return Adapted(model, rep, m.name, targets=names)
    budget = method_budget(model, m, names)
    if m.name == "adalora":
        rep = inject(model, "svd", budget.init_rank, m.alpha, targets, m.target_regex, m.dropout, m.rslora, train_modules, dtype, m.fused)
        layers = [layer for _, layer in svd_adapters(model)]
        reg = OrthGrad(layers, m.orth_weight, m.orth_form) if m.orth_weight > 0 else None
        return Adapted(model, rep, "adalora", budget.target_total, budget.init_rank, reg, names)
    return _apply_peft(model, m, names, train_modules, budget.init_rank, budget.target_total)


def _explicit_target(m: MethodConfig) -> bool:
    return m.target_total_rank is not None or m.target_params is not None


def method_budget(model: nn.Module, m: MethodConfig, names: list[str]) -> Budget:
    """The adaptive methods' initial rank and budgets for the adapted modules `names` of `model`."""
    shapes = [base_dims(model.get_submodule(n)) for n in names]
    return resolve_budget(shapes, None if _explicit_target(m) else m.r, m.target_total_rank, m.target_params, m.init_rank, m.init_ratio)


def _apply_peft(model: nn.Module, m: MethodConfig, names: list[str], train_modules: list[str], init_rank: int, target_total: int) -> Adapted:
    try:
        import peft
    except ImportError:
        raise ValueError(f"method.name: {m.name} needs the peft package (pip install peft)") from None
    # The task type picks PEFT's model class. Without it, `get_peft_model` returns a plain PeftModel whose
    # forward calls the base model directly and skips AdaLoraModel.forward, which is where PEFT adds its
    # orthogonal regulariser to the loss: PEFT's AdaLoRA would silently train with orth_reg_weight = 0.
    task_type = peft_task_type(model)
    # a copy: with SEQ_CLS, PEFT appends its head names (classifier, score) to the list it is given
    common = dict(target_modules=names, lora_alpha=m.alpha, lora_dropout=m.dropout,
                  modules_to_save=list(train_modules) or None, task_type=task_type)
    # The share is of the base model: counted before PEFT adds adapters and copies of the trained modules.
    base = sum(p.numel() for p in model.parameters())
    if m.name == "peft_lora":
        cfg = peft.LoraConfig(r=m.r, use_rslora=m.rslora, **common)
        pm = peft.get_peft_model(model, cfg)
        return Adapted(pm, _peft_report(pm, base), "peft_lora", targets=names)
    # AdaLoRA's config needs total_step up front; build_allocator sets it once T is known.
    target_r = target_total // len(names)
    cfg = peft.AdaLoraConfig(
        init_r=init_rank, target_r=target_r, tinit=0, tfinal=0, deltaT=m.delta_t, beta1=m.beta1, beta2=m.beta2,
        orth_reg_weight=m.orth_weight, total_step=10**9, **common,
    )
    pm = peft.get_peft_model(model, cfg)
    return Adapted(pm, _peft_report(pm, base), "peft_adalora", target_r * len(names), init_rank, None, names)


def peft_task_type(model: nn.Module) -> str:
    """PEFT's task type for a transformers model: SEQ_CLS or CAUSAL_LM, by the model's class."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    raise ValueError(f"method.name: the PEFT methods need a *ForSequenceClassification or *ForCausalLM model, got {name}")


def _peft_report(peft_model: nn.Module, base: int) -> ParamReport:
    rep = param_report(peft_model)  # it cannot tell PEFT's parameters from the base model's
    return ParamReport(rep.per_module, rep.trainable, base)


def build_allocator(a: Adapted, m: MethodConfig, total_steps: int):
    """The allocator for adaptive methods (None otherwise), with phases resolved from T."""
    if a.method not in ("adalora", "peft_adalora"):
        return None
    sch = make_schedule(total_steps, m.init_frac, m.final_frac, m.delta_t)
    if a.method == "adalora":
        return RankAllocator(svd_adapters(a.model), sch, a.target_total, m.beta1, m.beta2, m.score)
    return PeftAllocator(a.model, sch)


class PeftAllocator:
    """PEFT's `update_and_allocate` behind the same `step()` interface as ours, so the loop treats both alike."""

    def __init__(self, peft_model: nn.Module, schedule: Schedule) -> None:
        self.model = peft_model
        cfg = peft_model.peft_config["default"]
        cfg.total_step, cfg.tinit, cfg.tfinal, cfg.deltaT = schedule.total, schedule.t_init, schedule.t_final, schedule.delta_t
        self.ra = peft_model.base_model.rankallocator
        self.ra.set_total_step(schedule.total)
        self.schedule = schedule
        self.t = 0
        self.names = [n.replace("base_model.model.", "").replace(".lora_E.default", "") for n, _ in self._lora_E()]

    def _lora_E(self):
        return [(n, p) for n, p in self.model.named_parameters() if "lora_E.default" in n]

    def step(self, update_importance: bool = True) -> Allocation:
        self.t += 1
        t, sch = self.t, self.schedule
        end = sch.total - sch.t_final
        # PEFT updates no importance from T - t_f on, so those calls (the final mask, the re-masking)
        # are safe even on a step whose gradients the fp16 scaler rejected
        if update_importance or t >= end:
            self.model.base_model.update_and_allocate(t)
        budget, _ = self.ra.budget_schedule(t)
        lam = [p.detach().flatten() for _, p in self._lora_E()]
        mask = torch.cat(lam) != 0
        sizes = torch.tensor([x.numel() for x in lam], device=mask.device)
        ends = sizes.cumsum(0)
        phase = "init" if t <= sch.t_init else ("budget" if t < end else "final")
        return Allocation(t, budget, phase, False, None, mask, (ends - sizes, ends), self.names)

    def state_dict(self) -> dict:
        cfg = self.model.peft_config["default"]
        return {"t": self.t, "ipt": self.ra.ipt, "exp_avg_ipt": self.ra.exp_avg_ipt, "exp_avg_unc": self.ra.exp_avg_unc, "rank_pattern": cfg.rank_pattern}

    def load_state_dict(self, state: dict) -> None:
        self.t = state["t"]
        self.ra.ipt, self.ra.exp_avg_ipt, self.ra.exp_avg_unc = state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]
        self.model.peft_config["default"].rank_pattern = state["rank_pattern"]
