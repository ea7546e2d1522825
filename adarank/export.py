"""Export to a plain PEFT LoRA adapter: the one place where our names become PEFT's.

For an SVD adapter B = P·diag(λ·scale) over the kept triplets and A = Q; for a LoRA adapter
B = scale·B, A = A. The scale is folded into B, so every module gets lora_alpha = r (PEFT scale 1).
A module pruned to rank 0 is left out of `target_modules`: its ΔW is exactly zero.

Row i of an SVD module's lora_A (column i of lora_B) is its i-th triplet with λ ≠ 0, so a top-K truncation
(adarank/topk.py) is a choice of rows: `export_peft(..., scores=, budget=K)` from a model, `truncate_peft`
from an exported adapter folder and the importance scores saved beside it.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

import torch
from torch import nn

from .atomic import atomic_write_bytes, atomic_write_text
from .inject import adapters
from .layers import LoraLinear, SVDLinear
from .topk import aligned_scores, topk_keep

__all__ = ["export_peft", "peft_factors", "task_type_of", "truncate_peft", "write_peft", "save_importance",
           "load_importance", "PEFT_TASK_TYPES", "IMPORTANCE_FILE"]

#: The final importance of every exported triplet, beside adapter_model.safetensors: one float32 vector per
#: SVD module, aligned with the rows of its lora_A (adarank/topk.py)
IMPORTANCE_FILE = "importance.safetensors"

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
    scores: Mapping[str, torch.Tensor] | None = None,
    budget: int | None = None,
) -> dict[str, int]:
    """Write `adapter_config.json` and `adapter_model.safetensors` loadable by
    `peft.PeftModel.from_pretrained(base, out_dir)`. Returns the exported rank of every module.

    `modules_to_save` are names (suffixes) of fully trained modules, e.g. the classifier head; their
    weights are saved the way PEFT >= 0.14 saves `modules_to_save` (wrapper prefix removed).
    `base_model_name_or_path` (the folder or hub id the base model loads from) and `task_type` (one of
    `PEFT_TASK_TYPES`, e.g. "SEQ_CLS" or "CAUSAL_LM") go into adapter_config.json as they are; with both,
    `peft.AutoPeftModelForSequenceClassification.from_pretrained(out_dir)` (AutoPeftModelForCausalLM for
    "CAUSAL_LM") loads the adapter without being given the base. None writes null (PeftModel only).
    With `budget` (and `scores`: each SVD module's final importance per live triplet, adarank/topk.py) only
    the global top-`budget` triplets are exported: a truncation of what the model trained, the model unchanged.
    """
    if (scores is None) != (budget is None):
        raise ValueError("export_peft: give scores and budget together (a top-K truncation) or neither")
    if task_type is not None and task_type not in PEFT_TASK_TYPES:
        raise ValueError(f"export_peft: task_type {task_type!r} is not a PEFT task type; "
                         f"choose one of {', '.join(PEFT_TASK_TYPES)} or None")

    factors = {name: peft_factors(layer) for name, layer in adapters(model)}
    if budget is not None:
        if any(not isinstance(layer, SVDLinear) for _, layer in adapters(model)):
            raise ValueError("export_peft: budget truncates SVD adapters; the model has LoRA adapters")
        keep = topk_keep(aligned_scores(model, scores), budget)
        factors = {n: (A[keep[n]], B[:, keep[n]]) for n, (A, B) in factors.items()}
    mods = dict(model.named_modules())
    saved: dict[str, torch.Tensor] = {}
    for suffix in modules_to_save:
        hits = [n for n in mods if n and (n == suffix or n.endswith("." + suffix))]
        if not hits:
            raise ValueError(f"export_peft: modules_to_save entry {suffix!r} matches no module")
        for n in hits:
            for pn, p in mods[n].named_parameters():
                saved[f"base_model.model.{n}.{pn}"] = p.detach().float().contiguous()
    fan_in_fan_out = any(layer.transposed for _, layer in adapters(model))
    write_peft(out_dir, factors, saved, sorted(set(modules_to_save)), fan_in_fan_out, base_model_name_or_path, task_type)
    return {n: A.shape[0] for n, (A, _) in factors.items()}


def write_peft(out_dir: str, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], saved: Mapping[str, torch.Tensor],
               modules_to_save: Sequence[str], fan_in_fan_out: bool, base_model_name_or_path: str | None,
               task_type: str | None) -> None:
    """Write PEFT's LoRA files: `factors` is (A, B) per module name in PEFT's layout, scale folded in (rank-0
    modules are left out), `saved` the modules_to_save tensors under their PEFT names."""
    from safetensors.torch import save

    tensors = dict(saved)
    kept = {n: A.shape[0] for n, (A, _) in factors.items() if A.shape[0] > 0}
    for name in kept:
        A, B = factors[name]
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    if not kept and factors:
        # Every adapter is at rank 0 (e.g. an untrained SVD model, λ = 0). PEFT cannot load an adapter
        # with no target, so write one rank-1 module with B = 0: it loads and changes nothing.
        name, (A, B) = next(iter(factors.items()))
        kept[name] = 1
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(1, A.shape[1])
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(B.shape[0], 1)
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
        "modules_to_save": list(modules_to_save) or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(out_dir, "adapter_model.safetensors"), save(tensors, metadata={"format": "pt"}))
    atomic_write_text(os.path.join(out_dir, "adapter_config.json"), json.dumps(config, indent=2))


def save_importance(adapter_dir: str, scores: Mapping[str, torch.Tensor], score: str = "") -> None:
    """Write `IMPORTANCE_FILE` into an exported adapter folder: the scores of its SVD modules' exported
    triplets (`RankAllocator.final_importance()`); modules at rank 0 are left out, as the adapter leaves them."""
    from safetensors.torch import save

    tensors = {n: s.detach().float().cpu().contiguous() for n, s in scores.items() if s.numel() > 0}
    atomic_write_bytes(os.path.join(adapter_dir, IMPORTANCE_FILE), save(tensors, metadata={"score": score}))


def load_importance(adapter_dir: str) -> dict[str, torch.Tensor]:
    """The final importance scores saved beside an exported adapter (`IMPORTANCE_FILE`), per module."""
    from safetensors.torch import load_file

    path = os.path.join(adapter_dir, IMPORTANCE_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{adapter_dir}: no {IMPORTANCE_FILE} (only an adalora run saves its final importance)")
    return load_file(path)


def truncate_peft(adapter_dir: str, out_dir: str, budget: int,
                  scores: Mapping[str, torch.Tensor] | None = None) -> dict[str, int]:
    """From an adapter folder that export_peft wrote, write the PEFT LoRA of its global top-`budget` triplets
    into `out_dir` (modules_to_save copied as they are); `scores` default to the folder's importance file.
    Returns the rank of every scored module after the truncation (0: left out of target_modules)."""
    from safetensors.torch import load_file

    scores = load_importance(adapter_dir) if scores is None else scores
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    prefix, a_key, b_key = "base_model.model.", ".lora_A.weight", ".lora_B.weight"
    factors = {k[len(prefix):-len(a_key)]: (v, tensors[k[:-len(a_key)] + b_key])
               for k, v in tensors.items() if k.endswith(a_key)}
    if set(scores) != set(factors) or any(scores[n].numel() != A.shape[0] for n, (A, _) in factors.items()):
        raise ValueError(f"{adapter_dir}: {IMPORTANCE_FILE} does not match the adapter's modules and ranks")
    keep = topk_keep(scores, budget)
    factors = {n: (A[keep[n]], B[:, keep[n]]) for n, (A, B) in factors.items()}
    saved = {k: v for k, v in tensors.items() if not k.endswith((a_key, b_key))}
    write_peft(out_dir, factors, saved, config.get("modules_to_save") or [], bool(config.get("fan_in_fan_out")),
               config.get("base_model_name_or_path"), config.get("task_type"))
    return {n: int(k.sum()) for n, k in keep.items()}


def _esc(name: str) -> str:
    return name.replace(".", r"\.")
