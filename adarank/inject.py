"""Injection: wrap the target linear layers of any transformers model, freeze the rest, count parameters."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from . import unallocated
from .fast import link_siblings
from .layers import LoraLinear, SVDLinear, is_adaptable

__all__ = ["find_targets", "inject", "adapters", "svd_adapters", "ParamReport", "param_report", "linear_names"]

ADAPTERS = (LoraLinear, SVDLinear)


def linear_names(model: nn.Module) -> list[str]:
    """Names of every module an adapter could wrap."""
    return [n for n, m in model.named_modules() if is_adaptable(m) and n]


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def find_targets(model: nn.Module, targets: Sequence[str] | None = None, regex: str | None = None) -> list[str]:
    """Module names to adapt: linear layers whose name ends with one of `targets` (at a dot) or
    that fully match `regex`. Every suffix and the regex must match something."""
    if not targets and not regex:
        raise ValueError("method.targets: give target module suffixes or method.target_regex")
    names = linear_names(model)
    chosen: set[str] = set()
    for suffix in targets or []:
        hits = [n for n in names if _suffix_match(n, suffix)]
        if not hits:
            raise ValueError(
                f"method.targets: '{suffix}' matches no linear layer; the model's linear layers are: "
                + ", ".join(_compact(names))
            )
        chosen.update(hits)
    if regex:
        try:
            pat = re.compile(regex)
        except re.error as e:
            raise ValueError(f"method.target_regex: invalid regex {regex!r}: {e}") from None
        hits = [n for n in names if pat.fullmatch(n)]
        if not hits:
            raise ValueError(
                f"method.target_regex: {regex!r} matches no linear layer; the model's linear layers are: "
                + ", ".join(_compact(names))
            )
        chosen.update(hits)
    return [n for n in names if n in chosen]  # model order


def _compact(names: list[str]) -> list[str]:
    """Collapse layer indices so the error message stays one readable line."""
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(re.sub(r"\.\d+\.", ".N.", n), None)
    return list(seen)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(
    model: nn.Module,
    kind: str,
    r: int,
    alpha: float,
    targets: Sequence[str] | None = None,
    regex: str | None = None,
    dropout: float = 0.0,
    rslora: bool = False,
    train_modules: Sequence[str] = (),
    dtype: torch.dtype = torch.float32,
    fused: bool = False,
    ranks: dict[str, int] | None = None,
) -> "ParamReport":
    """Wrap the target layers with `kind` ("lora" or "svd") adapters in place and freeze the rest.

    `train_modules` are suffixes of modules trained in full (e.g. the classifier head). `fused` computes
    each adapted layer in one autograd function (adarank/fast/fused.py), and adapters that turn out to read
    one input together (adarank/fast/siblings.py). `ranks` gives a rank per module name (a rank pattern,
    adarank/rank_pattern.py) instead of `r`; a module at rank 0 stays unadapted. Returns the trainable-parameter report.
    """
    cls = {"lora": LoraLinear, "svd": SVDLinear}.get(kind)
    if cls is None:
        raise ValueError(f"method.kind: unknown adapter kind {kind!r}; choose lora or svd")
    names = find_targets(model, targets, regex)
    check_not_trained_in_full(model, names, targets, train_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    made = []
    for name in names:
        rank = r if ranks is None else ranks.get(name, 0)
        if rank == 0:
            continue
        base = model.get_submodule(name)
        made.append(cls(base, r=rank, alpha=alpha, dropout=dropout, rslora=rslora, dtype=dtype, fused=fused))
        _set_submodule(model, name, made[-1])
    if cls is SVDLinear:  # SVD adapters are meant to be allocated: warn if they train without an allocator
        unallocated.watch(made)
    link_siblings(model, adapters(model))
    unfreeze(model, train_modules)
    return param_report(model)


def check_not_trained_in_full(
    model: nn.Module, names: Sequence[str], targets: Sequence[str] | None, train_modules: Sequence[str]
) -> None:
    """Refuse adapting a module that `train_modules` also trains in full (it, or a module it is in): the
    exported adapter would hold both under names PEFT cannot match. Raises ValueError naming the modules."""
    modules = [n for n, _ in model.named_modules() if n]
    owners = {s: [m for m in modules if _suffix_match(m, s)] for s in train_modules}

    def trained(name: str, suffix: str) -> bool:
        return any(name == m or name.startswith(m + ".") for m in owners[suffix])

    both = [n for n in names if any(trained(n, s) for s in train_modules)]
    if not both:
        return
    by_suffix = any(_suffix_match(n, s) for n in both for s in targets or [])
    overlapping = [s for s in train_modules if any(trained(n, s) for n in both)]
    raise ValueError(
        f"{'method.targets' if by_suffix else 'method.target_regex'}: {', '.join(both)} "
        f"{'is' if len(both) == 1 else 'are'} also trained in full by model.train_modules ({', '.join(overlapping)}); "
        "a module is either adapted or trained in full: drop it from one of the two"
    )


def unfreeze(model: nn.Module, train_modules: Iterable[str]) -> None:
    """Make every parameter of the modules whose name ends with a given suffix trainable."""
    mods = dict(model.named_modules())
    for suffix in train_modules:
        hits = [n for n in mods if n and _suffix_match(n, suffix)]
        if not hits:
            top = sorted({n.split(".")[0] for n in mods if n})
            raise ValueError(
                f"model.train_modules: '{suffix}' matches no module; top-level modules are: {', '.join(top)}"
            )
        for n in hits:
            for p in mods[n].parameters():
                p.requires_grad_(True)


def adapters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every adapter in the model, found by type."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ADAPTERS)]


def svd_adapters(model: nn.Module) -> list[tuple[str, SVDLinear]]:
    """(name, layer) of every SVD adapter in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SVDLinear)]


@dataclass
class ParamReport:
    """Trainable parameters per module and in total, and their share of the base model."""

    per_module: dict[str, int] = field(default_factory=dict)
    trainable: int = 0
    base: int = 0

    @property
    def share(self) -> float:
        return self.trainable / self.base if self.base else 0.0

    def summary(self) -> str:
        return f"trainable params: {self.trainable:,} of {self.base:,} base ({100 * self.share:.4f}%)"


def param_report(model: nn.Module) -> ParamReport:
    """Count trainable parameters by owning module. For an adapter this is r(d+k) (plus r for λ)."""
    adapter_ids = {id(p) for _, m in adapters(model) for n, p in m.named_parameters() if not n.startswith("base.")}
    rep = ParamReport(base=sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids))
    for name, p in model.named_parameters():
        if p.requires_grad:
            owner = name.rpartition(".")[0]
            rep.per_module[owner] = rep.per_module.get(owner, 0) + p.numel()
            rep.trainable += p.numel()
    return rep
