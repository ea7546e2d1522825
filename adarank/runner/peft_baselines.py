"""PEFT's own LoRA and AdaLoRA as baselines inside our loop: built here, driven like ours.

`PeftAllocator` puts PEFT's `update_and_allocate` behind the `Allocator` contract, so the loop calls both
AdaLoRA implementations the same way (once per optimizer step, on unscaled gradients).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import nn

from ..allocation import Allocation
from ..export import task_type_of
from ..inject import ParamReport, param_report
from ..schedule import Schedule

__all__ = ["PeftAllocator", "peft_adalora", "peft_lora", "peft_task_type", "save_adapter"]


def _peft(method: str):
    try:
        import peft
    except ImportError:
        raise ValueError(f"method.name: {method} needs the peft package (pip install peft)") from None
    return peft


def peft_task_type(model: nn.Module) -> str:
    """PEFT's task type for a transformers model: SEQ_CLS or CAUSAL_LM, by the model's class."""
    task_type = task_type_of(model)
    if task_type is None:
        raise ValueError(f"method.name: the PEFT methods need a *ForSequenceClassification or *ForCausalLM model, "
                         f"got {type(model).__name__}")
    return task_type


def _common(model: nn.Module, targets: list[str], alpha: float, dropout: float, train_modules: list[str]) -> dict[str, Any]:
    # The task type picks PEFT's model class. Without it, `get_peft_model` returns a plain PeftModel whose
    # forward calls the base model directly and skips AdaLoraModel.forward, which is where PEFT adds its
    # orthogonal regulariser to the loss: PEFT's AdaLoRA would silently train with orth_reg_weight = 0.
    task_type = peft_task_type(model)
    # a copy: with SEQ_CLS, PEFT appends its head names (classifier, score) to the list it is given
    return dict(target_modules=targets, lora_alpha=alpha, lora_dropout=dropout,
                modules_to_save=list(train_modules) or None, task_type=task_type)


def _report(peft_model: nn.Module, base: int) -> ParamReport:
    rep = param_report(peft_model)  # it cannot tell PEFT's parameters from the base model's
    return ParamReport(rep.per_module, rep.trainable, base)


def peft_lora(model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, rslora: bool,
              train_modules: list[str]) -> tuple[nn.Module, ParamReport]:
    """PEFT's LoRA on the modules `targets` (full names); returns the PeftModel and its parameter report."""
    peft = _peft("peft_lora")
    common = _common(model, targets, alpha, dropout, train_modules)
    # The share is of the base model: counted before PEFT adds adapters and copies of the trained modules.
    base = sum(p.numel() for p in model.parameters())
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=rank, use_rslora=rslora, **common))
    return peft_model, _report(peft_model, base)


def peft_adalora(model: nn.Module, targets: list[str], init_rank: int, target_rank: int, alpha: float, dropout: float,
                 delta_t: int, beta1: float, beta2: float, orth_weight: float,
                 train_modules: list[str]) -> tuple[nn.Module, ParamReport]:
    """PEFT's AdaLoRA. Its config needs total_step up front; `PeftAllocator` sets the schedule once T is known."""
    peft = _peft("peft_adalora")
    common = _common(model, targets, alpha, dropout, train_modules)
    base = sum(p.numel() for p in model.parameters())
    cfg = peft.AdaLoraConfig(
        init_r=init_rank, target_r=target_rank, tinit=0, tfinal=0, deltaT=delta_t, beta1=beta1, beta2=beta2,
        orth_reg_weight=orth_weight, total_step=10**9, **common,
    )
    peft_model = peft.get_peft_model(model, cfg)
    return peft_model, _report(peft_model, base)


def save_adapter(peft_model: nn.Module) -> Callable[[str], None]:
    """Writes PEFT's own `adapter/` (save_pretrained) into an output dir."""
    return lambda out_dir: peft_model.save_pretrained(os.path.join(out_dir, "adapter"))


class PeftAllocator:
    """PEFT's `update_and_allocate` behind the `Allocator` contract, so the loop treats both alike."""

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

    def maybe_shrink(self, optimizer: torch.optim.Optimizer | None) -> bool:
        """PEFT only masks: its parameters are never replaced."""
        return False

    def state_dict(self) -> dict:
        cfg = self.model.peft_config["default"]
        return {"t": self.t, "ipt": self.ra.ipt, "exp_avg_ipt": self.ra.exp_avg_ipt, "exp_avg_unc": self.ra.exp_avg_unc, "rank_pattern": cfg.rank_pattern}

    def load_state_dict(self, state: dict) -> None:
        self.t = state["t"]
        self.ra.ipt, self.ra.exp_avg_ipt, self.ra.exp_avg_unc = state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]
        self.model.peft_config["default"].rank_pattern = state["rank_pattern"]
