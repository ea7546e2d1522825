"""The rank allocator: the stateful part of AdaLoRA, called once after each optimizer step.

Each call updates the importance EMAs, and at masking steps finds one global threshold over the triplet
scores of all adapted matrices (kthvalue) and zeroes λ below it. It returns data (`Allocation`);
logging is the caller's business.

Performance: per-element work is `torch._foreach_*` over all matrices, and the per-triplet means run on
matrices stacked by shape. One step is a fixed number of ops however deep the model is, and nothing
syncs with the host: the threshold, masks and ranks stay on the device.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from . import importance as imp
from .layers import SVDLinear
from .schedule import Schedule
from .shrink import remap_optimizer, shrink_layers

__all__ = ["RankAllocator", "Allocation"]

ROLES = ("P", "lam", "Q")


@dataclass
class Allocation:
    """What one allocator step did. Tensors live on the adapters' device; call `.tolist()` to log."""

    step: int
    budget: int
    phase: str  # "init", "budget" or "final"
    masked: bool  # whether a new mask was computed at this step
    threshold: torch.Tensor | None  # 0-d tensor, None when nothing needed pruning
    ranks: torch.Tensor  # (n_modules,) kept triplets per module, in `names` order
    names: list[str]

    def rank_dict(self) -> dict[str, int]:
        """{module name: rank}; syncs with the device."""
        return dict(zip(self.names, self.ranks.tolist()))


class RankAllocator:
    """Budget allocation over SVD adapters.

    Args:
        layers: (name, SVDLinear) pairs, e.g. `inject.svd_adapters(model)`.
        schedule: resolved phases in optimizer steps (`schedule.make_schedule`).
        target_total: final budget in triplets (`schedule.resolve_budget(...).target_total`).
        beta1, beta2: EMA coefficients for sensitivity and uncertainty, in [0, 1).
        score: "uncertainty" (paper), "sensitivity" or "magnitude" (paper ablations).
    """

    def __init__(
        self,
        layers: Sequence[tuple[str, SVDLinear]],
        schedule: Schedule,
        target_total: int,
        beta1: float = 0.85,
        beta2: float = 0.85,
        score: str = "uncertainty",
    ) -> None:
        if not layers:
            raise ValueError("method.targets: the model has no SVD adapters to allocate ranks to")
        for name, b in (("allocator.beta1", beta1), ("allocator.beta2", beta2)):
            if not 0 <= b < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {b}")
        if score not in imp.SCORES:
            raise ValueError(f"allocator.score: must be one of {imp.SCORES}, got {score!r}")
        self.names = [n for n, _ in layers]
        self.layers = [m for _, m in layers]
        self.schedule = schedule
        self.init_total = sum(m.r for m in self.layers)
        if not 1 <= target_total <= self.init_total:
            raise ValueError(
                f"allocator.target: final budget {target_total} must be in [1, {self.init_total}] "
                f"(the initial total rank)"
            )
        self.target_total = target_total
        self.beta1, self.beta2, self.score = beta1, beta2, score
        self.t = 0
        self.frozen = False  # final mask fixed (t >= T - t_f)
        self.shrunk = False
        self.ema_ipt: list[torch.Tensor] | None = None  # flat lists in (layer, role) order
        self.ema_unc: list[torch.Tensor] | None = None
        dev = self.layers[0].lam.device
        self.mask = torch.ones(self.init_total, dtype=torch.bool, device=dev)
        self._build_index()

    # ----- bookkeeping ---------------------------------------------------------------------------
    def _build_index(self) -> None:
        """Group matrices by shape and precompute the permutation back to module order."""
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
        # A persistent 0/1 copy of the mask with per-module views made once: applying the mask is then
        # one multi-tensor multiply with no per-step Python work proportional to depth.
        live = [i for i, m in enumerate(self.layers) if m.r > 0]
        self._mask_f = torch.ones(len(order), dtype=self.layers[0].lam.dtype, device=dev)
        views = self._mask_f.split(self.sizes)
        self._lams = [self.layers[i].lam for i in live]
        self._mask_views = [views[i] for i in live]

    def _params(self) -> list[nn.Parameter]:
        return [getattr(m, r) for m in self.layers for r in ROLES]

    def _grads(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        # A None gradient (unused or frozen module) counts as zero sensitivity.
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

    def ranks(self) -> torch.Tensor:
        """Kept triplets per module (device tensor)."""
        cs = torch.cat([self.mask.new_zeros(1, dtype=torch.long), self.mask.long().cumsum(0)])
        return cs[self._ends] - cs[self._starts]

    def module_masks(self) -> list[torch.Tensor]:
        """Per-module boolean masks (views)."""
        return list(self.mask.split(self.sizes))

    # ----- the algorithm ------------------------------------------------------------------------
    @torch.no_grad()
    def update_importance(self) -> None:
        """Update Ī and Ū from the current parameters and gradients (eq. 8-10)."""
        params = self._params()
        ipt = imp.sensitivity(params, self._grads(params))
        if self.ema_ipt is None:
            self.ema_ipt = [torch.zeros_like(p) for p in params]
            self.ema_unc = [torch.zeros_like(p) for p in params]
        imp.smooth_(self.ema_ipt, ipt, self.beta1)
        imp.uncertainty_(self.ema_unc, ipt, self.ema_ipt, self.beta2)

    @torch.no_grad()
    def triplet_scores(self) -> torch.Tensor:
        """S_i for every triplet, flat in module order."""
        if self.score == "magnitude":
            return torch.cat([m.lam.detach() for m in self.layers]).abs()
        if self.ema_ipt is None:
            return torch.zeros(self.init_total if not self.shrunk else sum(self.sizes), device=self.mask.device)
        s = imp.element_score(self.ema_ipt, self.ema_unc, self.score)
        by_role = {r: s[k :: len(ROLES)] for k, r in enumerate(ROLES)}
        per_group = [
            imp.triplet_score(
                torch.stack([by_role["lam"][i] for i in g]),
                torch.stack([by_role["P"][i] for i in g]),
                torch.stack([by_role["Q"][i] for i in g]),
            ).flatten()
            for g in self.groups
        ]
        return torch.cat(per_group)[self._to_module_order]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> torch.Tensor | None:
        """Keep triplets scoring above the (init − budget)-th smallest score; returns the threshold."""
        k = self.init_total - budget
        if k <= 0:  # PEFT crashes here (kthvalue k out of range, peft#2337); we keep everything
            self.mask.fill_(True)
            threshold = None
        elif self.ema_ipt is None and self.score != "magnitude":
            # No importance measured yet (e.g. the only step so far was skipped by the fp16 scaler):
            # all-zero scores would tie and prune everything, so the mask stays as it is.
            threshold = None
        else:
            scores = self.triplet_scores()
            threshold = torch.kthvalue(scores, k).values
            self.mask = scores > threshold  # ties at the threshold are pruned, as in PEFT
        self.apply_mask()
        return threshold

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
        dev = self.layers[0].lam.device
        if self.mask.device != dev:  # the model moved after the allocator was built
            self.mask = self.mask.to(dev)
            self.ema_ipt = None if self.ema_ipt is None else [x.to(dev) for x in self.ema_ipt]
            self.ema_unc = None if self.ema_unc is None else [x.to(dev) for x in self.ema_unc]
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
            # at this step). Afterwards the mask is fixed and the EMAs are freed.
            threshold, masked = self.mask_to_budget(self.target_total), True
            budget = self.target_total
            self.frozen = True
            self.ema_ipt = self.ema_unc = None
        elif not self.shrunk:
            self.apply_mask()  # the optimizer may have revived pruned λ; PEFT re-masks every step too
        phase = "init" if t <= sch.t_init else ("budget" if t < end else "final")
        return Allocation(t, budget, phase, masked, threshold, self.ranks(), self.names)

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
        self.mask = torch.ones(sum(m.r for m in self.layers), dtype=torch.bool, device=self.mask.device)
        self._build_index()

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
            "ema_ipt": None if self.ema_ipt is None else [x.clone() for x in self.ema_ipt],
            "ema_unc": None if self.ema_unc is None else [x.clone() for x in self.ema_unc],
            "init_total": self.init_total,
            "target_total": self.target_total,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state. A shrunk state shrinks this allocator's layers to match first; build the
        optimizer after this call so it sees the shrunk parameters."""
        if state["names"] != self.names:
            raise ValueError("allocator state: module names differ from the model's SVD adapters")
        if state["init_total"] != self.init_total or state["target_total"] != self.target_total:
            raise ValueError("allocator state: budgets differ from this run's configuration")
        dev = self.mask.device
        if state["shrunk"] and not self.shrunk:
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
        self.mask = state["mask"].to(dev)
        self.ema_ipt = None if state["ema_ipt"] is None else [x.to(dev) for x in state["ema_ipt"]]
        self.ema_unc = None if state["ema_unc"] is None else [x.to(dev) for x in state["ema_unc"]]
