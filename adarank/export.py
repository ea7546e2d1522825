"""Export to a plain PEFT LoRA adapter: the one place where our names become PEFT's.

For an SVD adapter B = P·diag(λ·scale) over the kept triplets and A = Q; for a LoRA adapter
B = scale·B, A = A. The scale is folded into B, so every module gets lora_alpha = r (PEFT scale 1).
A module pruned to rank 0 is left out of `target_modules`: its ΔW is exactly zero.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import torch
from torch import nn

from .atomic import atomic_write_bytes, atomic_write_text
from .inject import adapters
from .layers import LoraLinear, SVDLinear

__all__ = ["export_peft", "peft_factors", "task_type_of", "PEFT_TASK_TYPES"]

#: `peft.TaskType` values (peft is optional, so not imported here): what `task_type` may be. With one of them
#: and `base_model_name_or_path`, `peft.AutoPeftModelFor...` loads the adapter without being told the base.
PEFT_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


def task_type_of(model: nn.Module) -> str | None:
    """PEFT's task type for a transformers model, by its class: SEQ_CLS, CAUSAL_LM, or None for another head."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    return None


@torch.no_grad()
def peft_factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in PEFT's layout, (r, in) and (out, r), fp32, scale folded into B."""
    if isinstance(layer, SVDLinear):
        keep = (layer.lam != 0).nonzero().flatten()
        lam = layer.lam.float()[keep] * layer.scale
        return layer.Q.float()[keep].contiguous(), (layer.P.float()[:, keep] * lam).contiguous()
    if isinstance(layer, LoraLinear):
        return layer.lora_A.float().contiguous(), (layer.lora_B.float() * layer.scale).contiguous()
    raise TypeError(f"not an adarank adapter: {type(layer).__name__}")


def export_peft(
    model: nn.Module,
    out_dir: str,
    base_model_name_or_path: str | None = None,
    modules_to_save: Sequence[str] = (),
    task_type: str | None = None,
) -> dict[str, int]:
    """Write `adapter_config.json` and `adapter_model.safetensors` loadable by
    `peft.PeftModel.from_pretrained(base, out_dir)`. Returns the exported rank of every module.

    `modules_to_save` are names (suffixes) of fully trained modules, e.g. the classifier head; their
    weights are saved the way PEFT >= 0.14 saves `modules_to_save` (wrapper prefix removed).
    `base_model_name_or_path` (the folder or hub id the base model loads from) and `task_type` (one of
    `PEFT_TASK_TYPES`, e.g. "SEQ_CLS" or "CAUSAL_LM") go into adapter_config.json as they are; with both,
    `peft.AutoPeftModelForSequenceClassification.from_pretrained(out_dir)` (AutoPeftModelForCausalLM for
    "CAUSAL_LM") loads the adapter without being given the base. None writes null (PeftModel only).
    """
    from safetensors.torch import save

    if task_type is not None and task_type not in PEFT_TASK_TYPES:
        raise ValueError(f"export_peft: task_type {task_type!r} is not a PEFT task type; "
                         f"choose one of {', '.join(PEFT_TASK_TYPES)} or None")

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    fan_in_fan_out = False
    for name, layer in adapters(model):
        A, B = peft_factors(layer)
        ranks[name] = A.shape[0]
        if A.shape[0] == 0:
            continue
        fan_in_fan_out |= layer.transposed
        tensors[f"base_model.model.{name}.lora_A.weight"] = A
        tensors[f"base_model.model.{name}.lora_B.weight"] = B
    mods = dict(model.named_modules())
    saved: list[str] = []
    for suffix in modules_to_save:
        hits = [n for n in mods if n and (n == suffix or n.endswith("." + suffix))]
        if not hits:
            raise ValueError(f"export_peft: modules_to_save entry {suffix!r} matches no module")
        saved.append(suffix)
        for n in hits:
            for pn, p in mods[n].named_parameters():
                tensors[f"base_model.model.{n}.{pn}"] = p.detach().float().contiguous()
    kept = {n: r for n, r in ranks.items() if r > 0}
    if not kept and ranks:
        # Every adapter is at rank 0 (e.g. an untrained SVD model, λ = 0). PEFT cannot load an adapter
        # with no target, so write one rank-1 module with B = 0: it loads and changes nothing.
        name, layer = adapters(model)[0]
        kept[name] = 1
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(1, layer.in_features)
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(layer.out_features, 1)
        fan_in_fan_out |= layer.transposed
    # PEFT matches a target_modules list entry by equality or dotted suffix, and rank/alpha patterns by
    # regex against the name's dotted suffixes; escaped full names keep every pattern unambiguous.
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": max(kept.values(), default=1),
        "lora_alpha": max(kept.values(), default=1),
        "target_modules": sorted(kept),
        "rank_pattern": {_esc(n): r for n, r in kept.items()},
        "alpha_pattern": {_esc(n): r for n, r in kept.items()},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "modules_to_save": sorted(set(saved)) or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(out_dir, "adapter_model.safetensors"), save(tensors, metadata={"format": "pt"}))
    atomic_write_text(os.path.join(out_dir, "adapter_config.json"), json.dumps(config, indent=2))
    return ranks


def _esc(name: str) -> str:
    return name.replace(".", r"\.")
