"""The rank allocator: the stateful part of AdaLoRA, called once after each optimizer step.

Each call updates the importance EMAs, and at masking steps finds one global threshold over the triplet
scores of all adapted matrices (kthvalue) and zeroes λ below it. It returns data (`Allocation`);
logging is the caller's business.

Performance: per-element work runs on flat buffers holding all matrices (group-major by shape), and the
per-triplet means on (G, out, r) views of them. One step is a fixed number of ops however deep the model is, and nothing
syncs with the host: the threshold, masks and ranks stay on the device.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch import nn

from . import importance as imp
from . import unallocated
from .allocation import Allocation, segment_sums
from .layers import SVDLinear
from .schedule import Schedule
from .shrink import remap_optimizer, shrink_layers

__all__ = ["RankAllocator", "Allocation"]

ROLES = ("P", "lam", "Q")


class RankAllocator:
    """Budget allocation over SVD adapters.

    Args:
        layers: (name, SVDLinear) pairs, e.g. `inject.svd_adapters(model)`.
        schedule: resolved phases in optimizer steps (`schedule.make_schedule`).
        target_total: final budget in triplets (`schedule.resolve_budget(...).target_total`).
        beta1, beta2: EMA coefficients for sensitivity and uncertainty, in [0, 1).
        score: "uncertainty" (paper), "sensitivity" or "magnitude" (paper ablations).
        shrink_at_final: whether `maybe_shrink` removes the pruned triplets once the final mask is fixed.

    It satisfies `adarank.allocation.Allocator`, the contract the training loop relies on.
    """

    def __init__(
        self,
        layers: Sequence[tuple[str, SVDLinear]],
        schedule: Schedule,
        target_total: int,
        beta1: float = 0.85,
        beta2: float = 0.85,
        score: str = "uncertainty",
        shrink_at_final: bool = False,
    ) -> None:
        if not layers:
            raise ValueError("method.targets: the model has no SVD adapters to allocate ranks to")
        for name, b in (("method.beta1", beta1), ("method.beta2", beta2)):
            if not 0 <= b < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {b}")
        if score not in imp.SCORES:
            raise ValueError(f"method.score: must be one of {imp.SCORES}, got {score!r}")
        self.names = [n for n, _ in layers]
        self.layers = [m for _, m in layers]
        self.schedule = schedule
        # r_init, not r: layers shrunk before the allocator exists (a resumed run whose weights loaded at the
        # saved, shrunk shapes) keep the run's initial budget; `load_state_dict` then restores the rest
        self.init_total = sum(m.r_init for m in self.layers)
        self._needs_state = any(m.r != m.r_init for m in self.layers)
        if not 1 <= target_total <= self.init_total:
            raise ValueError(
                f"method.r: final budget {target_total} must be in [1, {self.init_total}] "
                f"(the initial total rank)"
            )
        self.target_total = target_total
        self.beta1, self.beta2, self.score = beta1, beta2, score
        self.shrink_at_final = shrink_at_final
        self.t = 0
        self.frozen = False  # final mask fixed (t >= T - t_f)
        self.shrunk = False
        self._ema_ipt: torch.Tensor | None = None  # flat, in the allocator's group-major layout
        self._ema_unc: torch.Tensor | None = None
        #: the scores of the final allocation (flat, module order, the current triplets), None before it
        self.final_scores: torch.Tensor | None = None
        dev = self.layers[0].lam.device
        self.mask = torch.ones(sum(m.r for m in self.layers), dtype=torch.bool, device=dev)
        self._build_index()
        unallocated.attach(self.layers)  # these adapters are allocated now: no warning that they are not

    # ----- bookkeeping ---------------------------------------------------------------------------
    def _build_index(self) -> None:
        """Group matrices by shape, lay their parameters out flat, and precompute the permutations.

        The flat layout is group-major: for each shape group, all its P, then all its Q, then all its λ.
        Each group's block is then a (G, out, r) / (G, r, in) / (G, r) view with no copy.
        """
        self.sizes = [m.r for m in self.layers]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, m in enumerate(self.layers):
            groups[(m.out_features, m.in_features, m.r)].append(i)
        self.groups = [g for g in groups.values() if self.layers[g[0]].r > 0]
        offsets = [0]
        for s in self.sizes:
            offsets.append(offsets[-1] + s)
        order = [offsets[i] + j for g in self.groups for i in g for j in range(self.sizes[i])]
        dev = self.mask.device
        grouped_pos = torch.empty(len(order), dtype=torch.long)
        grouped_pos[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        self._to_module_order = grouped_pos.to(dev)  # scores_module = scores_grouped[_to_module_order]
        self._starts = torch.tensor(offsets[:-1], dtype=torch.long, device=dev)
        self._ends = torch.tensor(offsets[1:], dtype=torch.long, device=dev)
        # flat parameter order and each group's slices in it
        self._flat_params: list[nn.Parameter] = []
        self._slices: list[tuple[slice, slice, slice, tuple[int, int, int, int]]] = []
        self._where: dict[tuple[int, str], tuple[int, torch.Size]] = {}  # (layer, role) -> (offset, shape)
        pos = 0
        for g in self.groups:
            m0 = self.layers[g[0]]
            G, out, inn, r = len(g), m0.out_features, m0.in_features, m0.r
            spans = []
            for role in ("P", "Q", "lam"):
                start = pos
                for i in g:
                    p = getattr(self.layers[i], role)
                    self._where[(i, role)] = (pos, p.shape)
                    self._flat_params.append(p)
                    pos += p.numel()
                spans.append(slice(start, pos))
            self._slices.append((spans[0], spans[1], spans[2], (G, out, inn, r)))
        self._numel = pos
        # A persistent 0/1 copy of the mask with per-module views made once: applying the mask is then
        # one multi-tensor multiply with no per-step Python work proportional to depth.
        live = [i for i, m in enumerate(self.layers) if m.r > 0]
        self._mask_f = torch.ones(len(order), dtype=self.layers[0].lam.dtype, device=dev)
        views = self._mask_f.split(self.sizes)
        self._lams = [self.layers[i].lam for i in live]
        self._mask_views = [views[i] for i in live]

    @staticmethod
    def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch._C._nn.flatten_dense_tensors(tensors)

    def _per_module(self, flat: torch.Tensor | None) -> list[torch.Tensor] | None:
        """Views of a flat state buffer as a list in (layer, role) order, roles P, lam, Q (PEFT's layout)."""
        if flat is None:
            return None
        out = []
        for i in range(len(self.layers)):
            for role in ROLES:
                if (i, role) in self._where:
                    off, shape = self._where[(i, role)]
                    out.append(flat[off : off + shape.numel()].view(shape))
                else:  # a rank-0 module holds no state
                    out.append(flat.new_zeros(getattr(self.layers[i], role).shape))
        return out

    @property
    def ema_ipt(self) -> list[torch.Tensor] | None:
        """Ī per parameter, in (layer, role) order, roles P, lam, Q; None outside the budgeting phase."""
        return self._per_module(self._ema_ipt)

    @property
    def ema_unc(self) -> list[torch.Tensor] | None:
        """Ū per parameter, in the same order as `ema_ipt`."""
        return self._per_module(self._ema_unc)

    def ranks(self) -> torch.Tensor:
        """Kept triplets per module (device tensor)."""
        return segment_sums(self.mask, self._starts, self._ends)

    def module_masks(self) -> list[torch.Tensor]:
        """Per-module boolean masks (views)."""
        return list(self.mask.split(self.sizes))

    # ----- the algorithm ------------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self) -> None:
        """Update Ī and Ū from the current parameters and gradients (eq. 8-10), on flat buffers."""
        params = self._flat_params
        # A None gradient (unused or frozen module) counts as zero sensitivity.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        ipt = imp.sensitivity(self._flat(params), self._flat(grads))
        if self._ema_ipt is None:
            self._ema_ipt = torch.zeros_like(ipt)
            self._ema_unc = torch.zeros_like(ipt)
        imp.smooth_(self._ema_ipt, ipt, self.beta1)
        imp.uncertainty_(self._ema_unc, ipt, self._ema_ipt, self.beta2)

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """S_i for every triplet, flat in module order."""
        if self.score == "magnitude":
            return self._magnitude()
        if self._ema_ipt is None:
            return torch.zeros(sum(self.sizes), device=self.mask.device)
        s = imp.element_score(self._ema_ipt, self._ema_unc, self.score)
        per_group = [
            imp.triplet_score(s[sl].view(G, r), s[sp].view(G, out, r), s[sq].view(G, r, inn)).flatten()
            for sp, sq, sl, (G, out, inn, r) in self._slices
        ]
        return torch.cat(per_group)[self._to_module_order]

    @torch.no_grad()
    def mask_to_budget(self, budget: int, exact: bool = False) -> torch.Tensor | None:
        """Keep triplets scoring above the (init − budget)-th smallest score; returns the threshold.

        Ties at the threshold are pruned, as in PEFT. With `exact` (the final allocation, and the
        |λ| score whose values tie at 0 early on) exactly `budget` triplets are kept, ties broken by
        position; without ties both rules keep the same set.
        """
        k = self.init_total - budget
        if k <= 0:  # PEFT crashes here (kthvalue k out of range, peft#2337); we keep everything
            self.mask = torch.ones_like(self.mask)
            self.apply_mask()
            return None
        magnitude = self.score == "magnitude"
        if self._ema_ipt is None and not magnitude and not exact:
            # No importance measured yet (e.g. the only step so far was skipped by the fp16 scaler):
            # all-zero scores would tie and prune everything, so the mask stays as it is.
            return None
        scores = self._allocation_scores()
        threshold = torch.kthvalue(scores, k).values
        if exact or magnitude:
            mask = torch.zeros_like(self.mask)
            mask[torch.topk(scores, budget, sorted=False).indices] = True
            self.mask = mask
        else:
            self.mask = scores > threshold
        self.apply_mask()
        return threshold

    def _allocation_scores(self) -> torch.Tensor:
        """The scores a mask is computed from: a final allocation with no importance measured falls back to
        |λ|, so the budget still holds."""
        measured = self._ema_ipt is not None or self.score == "magnitude"
        return self.triplet_scores() if measured else self._magnitude()

    @torch.no_grad()
    def final_importance(self) -> dict[str, torch.Tensor] | None:
        """The scores of the final allocation, per module, one per live triplet (λ ≠ 0, in order: the rows of
        its exported lora_A), on the CPU; None before the final allocation. They order every kept triplet
        globally, so `adarank.topk` can truncate the run to any smaller budget."""
        if self.final_scores is None:
            return None
        per_module = self.final_scores.float().cpu().split(self.sizes)
        return {n: s[(m.lam.detach() != 0).cpu()].clone() for n, m, s in zip(self.names, self.layers, per_module)}

    def _magnitude(self) -> torch.Tensor:
        return torch.cat([m.lam.detach() for m in self.layers]).abs()

    @torch.no_grad()
    def apply_mask(self) -> None:
        """λ ← λ·mask, one multi-tensor op for all modules."""
        self._mask_f.copy_(self.mask)
        torch._foreach_mul_(self._lams, self._mask_views)

    def step(self, update_importance: bool = True) -> Allocation:
        """Call once after each optimizer step (on unscaled gradients, before zero_grad).

        `update_importance=False` is for a step the optimizer skipped (fp16 overflow): the schedule
        advances but inf/NaN gradients do not pollute the EMAs.
        """
        if self._needs_state:
            raise RuntimeError("RankAllocator: its adapters were shrunk before it was built; load_state_dict() the "
                               "saved allocator state before stepping")
        dev = self.layers[0].lam.device
        if self.mask.device != dev:  # the model moved after the allocator was built
            self.mask = self.mask.to(dev)
            self._ema_ipt = None if self._ema_ipt is None else self._ema_ipt.to(dev)
            self._ema_unc = None if self._ema_unc is None else self._ema_unc.to(dev)
            self._build_index()
        self.t += 1
        t, sch = self.t, self.schedule
        end = sch.total - sch.t_final
        budget, do_mask = sch.at(t, self.init_total, self.target_total)
        threshold, masked = None, False
        if t < end:
            if update_importance:
                self.update_importance()
            if do_mask:
                threshold, masked = self.mask_to_budget(budget), True
        elif not self.frozen:
            # The final allocation at t = T - t_f (PEFT's force_mask; like PEFT, no importance update
            # at this step). Afterwards the mask is fixed and the EMAs are freed; the scores it used are kept.
            self.final_scores = self._allocation_scores().clone()
            threshold, masked = self.mask_to_budget(self.target_total, exact=True), True
            budget = self.target_total
            self.frozen = True
            self._ema_ipt = self._ema_unc = None
        elif not self.shrunk:
            self.apply_mask()  # the optimizer may have revived pruned λ; PEFT re-masks every step too
        phase = "init" if t <= sch.t_init else ("budget" if t < end else "final")
        return Allocation(t, budget, phase, masked, threshold, self.mask, (self._starts, self._ends), self.names)

    # ----- shrink -------------------------------------------------------------------------------
    def shrink(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Physically remove pruned triplets (only once the final mask is fixed)."""
        if not self.frozen:
            raise RuntimeError("shrink is only allowed after the final budget is reached (t >= T - t_f)")
        if self.shrunk:
            return
        swaps = shrink_layers(self.layers, self.module_masks())
        if optimizer is not None:
            remap_optimizer(optimizer, swaps)
        self.shrunk = True
        if self.final_scores is not None:  # they follow the kept triplets, as the parameters do
            self.final_scores = self.final_scores[self.mask]
        self.mask = torch.ones(sum(m.r for m in self.layers), dtype=torch.bool, device=self.mask.device)
        self._build_index()

    def maybe_shrink(self, optimizer: torch.optim.Optimizer | None) -> bool:
        """The loop's shrink hand-off: with `shrink_at_final`, shrink once the final mask is fixed; True
        when parameters were replaced (at most once per run)."""
        if not (self.shrink_at_final and self.frozen and not self.shrunk):
            return False
        self.shrink(optimizer)
        return True

    # ----- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue the schedule exactly: step, EMAs, mask, phase flags."""
        return {
            "t": self.t,
            "frozen": self.frozen,
            "shrunk": self.shrunk,
            "names": list(self.names),
            "sizes": list(self.sizes),
            "mask": self.mask.clone(),
            "ema_ipt": None if self._ema_ipt is None else self._ema_ipt.clone(),
            "ema_unc": None if self._ema_unc is None else self._ema_unc.clone(),
            "init_total": self.init_total,
            "target_total": self.target_total,
            "final_scores": None if self.final_scores is None else self.final_scores.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state. A shrunk state shrinks this allocator's layers to match first; build the
        optimizer after this call so it sees the shrunk parameters. Layers that already have the saved shapes
        (the shrunk weights were loaded first, as the transformers Trainer does) are left as they are."""
        if state["names"] != self.names:
            raise ValueError("allocator state: module names differ from the model's SVD adapters")
        if state["init_total"] != self.init_total or state["target_total"] != self.target_total:
            raise ValueError("allocator state: budgets differ from this run's configuration")
        dev = self.mask.device
        if state["shrunk"] and not self.shrunk and [m.r for m in self.layers] == list(state["sizes"]):
            # The layers hold the saved shapes already (their weights were loaded first, `SVDLinear`'s load
            # hook): nothing to remove, and the parameters (which an optimizer may hold) stay the same objects.
            self.frozen = self.shrunk = True
            self.mask = torch.ones(sum(state["sizes"]), dtype=torch.bool, device=dev)
            self._build_index()
        elif state["shrunk"] and not self.shrunk:
            # Recreate the shrink from the recorded ranks: the kept triplets are stored first.
            self.frozen = True
            self.mask = torch.zeros(self.init_total, dtype=torch.bool, device=dev)
            masks = self.module_masks()
            for mk, r in zip(masks, state["sizes"]):
                mk[:r] = True
            self.shrink(None)
        if [m.r for m in self.layers] != list(state["sizes"]):
            raise ValueError("allocator state: adapter ranks differ from the saved ones")
        self.t, self.frozen, self.shrunk = state["t"], state["frozen"], state["shrunk"]
        self._needs_state = False
        self.mask = state["mask"].to(dev)
        for key in ("ema_ipt", "ema_unc"):
            v = state[key]
            if v is not None and v.numel() != self._numel:
                raise ValueError(f"allocator state: {key} has {v.numel()} entries, the adapters have {self._numel}")
            setattr(self, "_" + key, None if v is None else v.to(dev))
        final = state.get("final_scores")  # absent from the checkpoints of older versions
        self.final_scores = None if final is None else final.to(dev)
