"""EVA (Paischer et al. 2024, arXiv 2410.07170): LoRA ranks and A from the explained variance of the inputs.

Batches run through the frozen model; a forward hook on each target linear layer takes its inputs (the
tokens the attention mask keeps, and with `use_label_mask` those whose token-level label is not -100), and
an incremental SVD of them (`ipca.IncrementalPCA`) runs until each layer's leading right-singular vectors
stop moving: a component has converged when its cosine similarity to the previous step's is >= tau (PEFT's
check), and a layer when the first `rank` of them have, `rank` being what the redistribution currently
gives it. The total rank N·r then goes to the N·r components of largest explained-variance ratio over all
layers, at most round(ρ·r) per layer; a layer that gets none stays unadapted. A = the top `rank`
right-singular vectors (divided by √σ with `whiten`).

This is PEFT's `get_eva_state_dict` (peft/tuners/lora/eva.py), step for step: layers whose inputs are
equal on the first batch share one SVD (the first of them, in model order, gets the larger rank of a
pair); a batch with fewer tokens than a layer's components skips that layer; a converged layer stops
fitting and resumes if the redistribution later asks it for more components. Where ours differs:
* the SVD is exact and batched over the layers of one input width (ipca.py; PEFT: torch.svd_lowrank);
* the batches are cycled at most `max_forwards` times in all, then `EvaNotConverged` names the layers
  (PEFT cycles its loader until every layer converges, with no limit);
* a layer gets at most its input width of components (PEFT raises when round(ρ·r) exceeds it);
* a layer whose input has no token axis (BERT's pooler reads one vector per row) uses every row
  (PEFT's language-modelling input function cannot index such an input and fails);
* with `whiten`, each layer's A is divided by √σ once; PEFT divides a shared SVD's components in place,
  once for every layer sharing it, so each of n layers with one input ends up divided by σ^(n/2).
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .ipca import IncrementalPCA
from .layers import base_dims

__all__ = ["EvaResult", "EvaNotConverged", "eva", "distribute_ranks", "token_mask", "LABEL_IGNORE"]

LABEL_IGNORE = -100  #: the label of tokens a loss ignores (transformers' convention)


class EvaNotConverged(ValueError):
    """Some layer's components did not converge within the forward passes allowed."""


@dataclass
class EvaResult:
    """Per target (model order): its rank and A init (rank, in_features), float32 on the CPU."""

    ranks: dict[str, int]
    init: dict[str, torch.Tensor]
    #: layer -> the layer whose SVD it shares (equal inputs on the first batch)
    shared: dict[str, str] = field(default_factory=dict)
    forwards: int = 0  #: forward passes the SVD took
    explained: dict[str, list[float]] = field(default_factory=dict)  #: explained-variance ratios per SVD


def token_mask(batch: Mapping[str, torch.Tensor], use_label_mask: bool) -> torch.Tensor:
    """(B, L) bool: the tokens whose inputs enter the SVD. Labels mask only when they are per token."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
    labels = batch.get("labels")
    if use_label_mask and labels is not None and labels.shape == ids.shape:
        mask = mask & (labels != LABEL_IGNORE)
    return mask


def _layer_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The SVD's rows of one layer input: the kept tokens, or every row of an input without a token axis."""
    if x.shape[:-1] == mask.shape:
        return x[mask]
    return x.reshape(-1, x.shape[-1])


def distribute_ranks(ratios: Mapping[str, torch.Tensor], layer_hook: Mapping[str, str], budget: int,
                     shared: Mapping[str, str]) -> dict[str, int]:
    """PEFT's `_get_rank_distribution`: the `budget` largest explained-variance ratios over all layers (each
    layer counts its SVD's ratios, already cut to its maximum rank), as a rank per layer (`layer_hook`'s
    order); a layer sharing an SVD swaps ranks with the layer that owns it if it got more."""
    keys = [k for k, h in layer_hook.items() for _ in range(len(ratios[h]))]
    values = torch.cat([ratios[h].double().cpu() for h in layer_hook.values()])
    # torch's (unstable) descending sort, as PEFT calls it, on the CPU: ties (the copies of a shared SVD's
    # ratios) fall the same way as in PEFT; stable=True would favour the earlier layer instead
    order = values.argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget].tolist())
    ranks = {k: counts.get(k, 0) for k in layer_hook}
    for k, owner in shared.items():
        if ranks[owner] < ranks[k]:
            ranks[owner], ranks[k] = ranks[k], ranks[owner]
    return ranks


def _shared_inputs(captured: dict[str, torch.Tensor]) -> dict[str, str]:
    """{layer: first layer (model order) with exactly the same input}, from one batch's inputs."""
    owners: list[str] = []
    shared = {}
    for name, x in captured.items():
        hit = next((o for o in owners if captured[o].shape == x.shape and torch.equal(captured[o], x)), None)
        if hit is None:
            owners.append(name)
        else:
            shared[name] = hit
    return shared


class _Svds:
    """The incremental SVDs of the owning layers, one IncrementalPCA per (input width, components)."""

    def __init__(self, widths: dict[str, int], components: dict[str, int]) -> None:
        self.groups: dict[tuple[int, int], list[str]] = {}
        for name in widths:
            self.groups.setdefault((widths[name], components[name]), []).append(name)
        self.pca = {key: IncrementalPCA(len(names), *key) for key, names in self.groups.items()}
        self.where = {n: (key, i) for key, names in self.groups.items() for i, n in enumerate(names)}
        self.converged = {n: torch.zeros(components[n], dtype=torch.bool) for n in widths}

    def fitted(self, name: str) -> bool:
        key, i = self.where[name]
        return bool(self.pca[key].fitted[i])

    def fit(self, rows: dict[str, torch.Tensor], tau: float) -> None:
        """One step of each layer in `rows` (its new rows); a layer with fewer rows than components skips it.
        Layers of one IncrementalPCA step together when they have as many rows and were fitted before alike."""
        for key, names in self.groups.items():
            buckets: dict[tuple[int, bool], list[str]] = {}
            for n in names:
                if n in rows and rows[n].shape[0] >= key[1]:
                    buckets.setdefault((rows[n].shape[0], self.fitted(n)), []).append(n)
            pca = self.pca[key]
            for (_, had), todo in buckets.items():
                idx = torch.tensor([self.where[n][1] for n in todo])
                before = pca.components_[idx.to(pca.components_.device)].clone() if had else None
                pca.partial_fit(torch.stack([rows[n] for n in todo]), idx)
                if before is None:
                    continue
                sim = torch.nn.functional.cosine_similarity(pca.components_[idx.to(before.device)], before, dim=-1)
                for n, s in zip(todo, (sim >= tau).cpu()):
                    self.converged[n] = s

    def get(self, name: str, attr: str) -> torch.Tensor:
        key, i = self.where[name]
        return getattr(self.pca[key], attr)[i]


def _forward_default(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> None:
    model(**batch)


@torch.no_grad()
def eva(model: nn.Module, names: Sequence[str], batches: Iterable[Mapping[str, torch.Tensor]], r: int,
        rho: float = 2.0, tau: float = 0.99, whiten: bool = False, use_label_mask: bool = True,
        max_forwards: int | None = None, forward: Callable[[nn.Module, dict], None] = _forward_default) -> EvaResult:
    """EVA's ranks and A for the linear layers `names` of the frozen `model` (on its device), from
    `batches` cycled until every layer converged. Raises EvaNotConverged after `max_forwards` passes."""
    batches = list(batches)
    if not batches:
        raise ValueError("eva: no batches")
    modules = {n: model.get_submodule(n) for n in names}
    widths = {n: base_dims(m)[0] for n, m in modules.items()}
    max_comp = {n: min(round(r * rho), widths[n]) for n in names}
    device = next(model.parameters()).device
    captured: dict[str, torch.Tensor] = {}
    state = {"mask": None, "active": set(names)}

    def hook(name):
        def fn(module, args, output):
            if name in state["active"]:
                captured[name] = _layer_rows(args[0], state["mask"]).detach()
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        forwards, shared, svds, rank_dist = 0, {}, None, dict(max_comp)
        flags: dict[str, bool] = {}
        for batch in itertools.cycle(batches):
            if svds is not None:
                for n in flags:  # PEFT's check: the first rank_dist[n] components of n have converged
                    flags[n] = bool(svds.converged[n][: rank_dist[n]].all())
                if all(flags.values()):
                    break
                state["active"] = {n for n, done in flags.items() if not done}
            if max_forwards is not None and forwards >= max_forwards:
                raise EvaNotConverged(_not_converged(flags, svds, max_comp, forwards, tau))
            batch = {k: v.to(device) for k, v in batch.items()}
            state["mask"] = token_mask(batch, use_label_mask)
            captured.clear()
            forward(model, batch)
            forwards += 1
            if svds is None:  # the first batch: which layers share an input, then one SVD per owner
                shared = _shared_inputs(captured)
                for group in _groups(shared):
                    top = max(max_comp[n] for n in group)
                    for n in group:
                        max_comp[n] = top
                rank_dist = dict(max_comp)
                owners = [n for n in names if n not in shared]
                svds = _Svds({n: widths[n] for n in owners}, {n: max_comp[n] for n in owners})
                flags = {n: False for n in owners}
            svds.fit({n: captured[n] for n in state["active"] if n in captured and n in flags}, tau)
            if all(svds.fitted(n) for n in flags):
                layer_hook = {**{n: n for n in flags}, **shared}
                ratios = {n: svds.get(n, "explained_variance_ratio_")[: max_comp[n]] for n in flags}
                rank_dist = distribute_ranks(ratios, layer_hook, r * len(names), shared)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return _result(names, rank_dist, shared, svds, whiten, forwards, max_comp)


def _not_converged(flags: dict[str, bool], svds: "_Svds | None", max_comp: dict[str, int], forwards: int,
                   tau: float) -> str:
    """Which layers held the SVD up: never fitted (fewer rows per batch than components), or not converged."""
    starved = [n for n in flags if svds is not None and not svds.fitted(n)]
    if starved:
        return (f"eva: {_few(starved)} got fewer rows per batch than its {max_comp[starved[0]]} components in "
                f"{forwards} forward passes: use larger batches or a smaller rank")
    late = [n for n, done in flags.items() if not done] or list(max_comp)
    return f"eva: {_few(late)} not converged after {forwards} forward passes (tau={tau})"


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _groups(shared: Mapping[str, str]) -> list[list[str]]:
    """Layers sharing one input, the owner first."""
    groups: dict[str, list[str]] = {}
    for n, owner in shared.items():
        groups.setdefault(owner, [owner]).append(n)
    return list(groups.values())


def _result(names: Sequence[str], rank_dist: dict[str, int], shared: dict[str, str], svds: _Svds, whiten: bool,
            forwards: int, max_comp: dict[str, int]) -> EvaResult:
    ranks, init = {}, {}
    for n in names:
        owner = shared.get(n, n)
        rank = rank_dist[n]
        u = svds.get(owner, "components_")[:rank]
        if whiten:
            u = u / svds.get(owner, "singular_values_")[:rank].sqrt().reshape(-1, 1)
        ranks[n], init[n] = rank, u.float().cpu().contiguous()
    explained = {n: svds.get(n, "explained_variance_ratio_")[: max_comp[n]].tolist() for n in names if n not in shared}
    return EvaResult(ranks, init, dict(shared), forwards, explained)
