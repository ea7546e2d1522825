"""SoRA (Ding et al. 2023, arXiv 2311.11696): the SVD adapter's λ as a gate per rank, made sparse by a proximal L1 step.

After every optimizer step every λ goes through the soft threshold of the L1 norm,

    λ ← sign(λ) · max(|λ| − τ_t, 0),   τ_t = ξ · η_t,

with η_t the learning rate the optimizer used at that step (the paper's T_{η_t·ξ}). A rank whose gate reaches
zero computes nothing; the mask is λ ≠ 0. The threshold acts in the budgeting phase (t_i < t ≤ T − t_f); at
t = T − t_f the mask is fixed (then re-applied every step, as AdaLoRA's final mask is) and, with
`shrink_at_final`, the dead triplets are removed by the same shrink as AdaLoRA's (`shrink.py`).

Two variants (`targeted`):
- fixed ξ (`targeted=False`, the paper's): ξ is a constant and the final rank is wherever it lands. The
  budget reported each step is the live count (one host sync per step).
- budget-targeted (`targeted=True`): ξ starts at `xi` and is tuned by a controller so the live count follows
  AdaLoRA's cubic budget b(t) (`schedule.budget_at`). At every masking step of the budgeting phase (every ΔT
  steps), n_t = #(λ ≠ 0) after the threshold: ξ ← ξ·ρ if n_t > b(t), ξ ← ξ/ρ if n_t < b(t), unchanged if
  equal. ρ = `xi_growth`; by default it is derived from the schedule, ρ = 10^(4/M) with M the number of masking
  steps in the budgeting phase, so that ξ can move four decades over it however long the run is (a fixed ρ is
  either too slow for a short run, where the final prune then does all the work, or too jumpy for a long one). At t = T − t_f the threshold is applied once more, then the remainder is hard-pruned
  by |λ|: exactly `target_total` triplets, those of largest |λ|, are kept (ties by position), so the run ends
  on AdaLoRA's final budget and the two compare at equal parameters. Should fewer than the target be alive
  then, the kept set is filled up with dead triplets (λ = 0), which train on from zero.

How this relates to the reference code (TsinghuaC3I/SoRA): its gates train in a separate AdamW (at the same lr
by default, no weight decay, the same warm-up/decay schedule) whose step ends with the threshold; here λ trains
in the loop's AdamW with P and Q (the same with train.weight_decay = 0, the default) and the threshold follows
the optimizer. Its `src/sparse_optimizer.py`, which its run_glue.py imports, thresholds by ξ alone, not ξ·η_t
(`sparse_optimizer_multiply_lr.py` has ξ·lr, as the paper); and its three in-place masked updates zero every
|λ| < 2τ rather than |λ| ≤ τ. Here it is the exact proximal operator with τ = ξ·η_t. Its extra L1 term in the
loss (`sparse_lambda`) is not implemented: the proximal step alone is the paper's Algorithm 1.

The learning rate: the loop hands the optimizer to `maybe_shrink` after every step, when the lr schedule has
already moved to the next step's lr; the allocator keeps it for the next threshold (and in its state, so a
resumed run uses the same). The very first step of a fresh run therefore has no lr to threshold with and
applies none (the budgeting phase starts after it unless init_frac = 0; then step 1 alone is unthresholded).

Per-step work is a fixed number of ops however deep the model is: the gates are read as one flat tensor and
written back with one multi-tensor copy; the controller runs on the device, so the targeted variant does not
sync with the host.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import unallocated
from .allocation import Allocation, segment_sums
from .layers import SVDLinear
from .schedule import Schedule
from .shrink import remap_optimizer, shrink_layers

__all__ = ["SoraAllocator", "soft_threshold", "init_gates_", "GATE_INITS"]

GATE_INITS = ("normal", "zero")


def soft_threshold(x: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """The proximal operator of τ·‖x‖₁: sign(x)·max(|x| − τ, 0)."""
    return x.sign() * (x.abs() - tau).clamp_min(0)


@torch.no_grad()
def init_gates_(layers: Sequence[SVDLinear], how: str) -> None:
    """Initialise the gates. `normal` (SoRA's): λ ~ N(0, 1) and P = 0, so ΔW starts at zero as SoRA's B = 0 makes
    it (Q keeps its N(0, 0.02)); `zero` (AdaLoRA's, `SVDLinear`'s own): λ = 0, P and Q ~ N(0, 0.02). Draws from
    the global RNG, like the layers' own init."""
    if how not in GATE_INITS:
        raise ValueError(f"method.sora_gate_init: must be one of {GATE_INITS}, got {how!r}")
    if how == "zero":
        return
    for m in layers:
        m.lam.normal_(0.0, 1.0)
        m.P.zero_()


class SoraAllocator:
    """SoRA's gated sparsity over SVD adapters; satisfies `adarank.allocation.Allocator`.

    Args:
        layers: (name, SVDLinear) pairs, e.g. `inject.svd_adapters(model)`.
        schedule: resolved phases in optimizer steps (`schedule.make_schedule`).
        target_total: final budget in triplets (targeted: landed on exactly; fixed: only checked for range).
        xi: ξ, the L1 strength (>= 0); targeted: its starting value.
        targeted: tune ξ to follow the cubic budget and hard-prune to `target_total` at T − t_f.
        xi_growth: ρ > 1, the controller's factor per masking step (targeted only); None: 10^(4/M), M the
            masking steps of the budgeting phase.
        shrink_at_final: whether `maybe_shrink` removes the dead triplets once the final mask is fixed.
        on_final: called with the number of kept triplets when the final mask is fixed (and again when a
            resumed run restores a fixed mask).
    """

    def __init__(self, layers: Sequence[tuple[str, SVDLinear]], schedule: Schedule, target_total: int,
                 xi: float, targeted: bool = True, xi_growth: float | None = None, shrink_at_final: bool = False,
                 on_final: Callable[[int], None] | None = None) -> None:
        if not layers:
            raise ValueError("method.targets: the model has no SVD adapters to gate")
        if not xi >= 0:
            raise ValueError(f"method.sora_xi: must be >= 0, got {xi}")
        if xi_growth is None:
            end = schedule.total - schedule.t_final
            masking = sum(1 for t in range(schedule.t_init + 1, end) if t % schedule.delta_t == 0)
            xi_growth = 10 ** (4 / max(1, masking))
        if not xi_growth > 1:
            raise ValueError(f"method.sora_xi_growth: must be > 1, got {xi_growth}")
        self.names = [n for n, _ in layers]
        self.layers = [m for _, m in layers]
        self.schedule, self.targeted, self.xi_growth = schedule, targeted, xi_growth
        self.shrink_at_final, self.on_final = shrink_at_final, on_final
        self.init_total = sum(m.r for m in self.layers)
        if not 1 <= target_total <= self.init_total:
            raise ValueError(f"method.r: final budget {target_total} must be in [1, {self.init_total}] "
                             "(the initial total rank)")
        self.target_total = target_total
        dev = self.layers[0].lam.device
        self.t, self.frozen, self.shrunk = 0, False, False
        self.xi = torch.tensor(float(xi), device=dev)  # a device scalar: the controller never syncs
        self.lr: float | torch.Tensor | None = None  # the lr of the coming optimizer step (from maybe_shrink)
        self.final_total: int | None = None
        unallocated.attach(self.layers)  # these adapters are allocated now: no warning that they are not
        self.mask = torch.ones(self.init_total, dtype=torch.bool, device=dev)
        self._build_index()

    def _build_index(self) -> None:
        """The gates as a list, their sizes and offsets, and a persistent flat buffer with per-module views made
        once: writing the flat result back is then one multi-tensor copy with no per-step work per layer."""
        self.sizes = [m.r for m in self.layers]
        dev = self.layers[0].lam.device
        ends = torch.tensor(self.sizes, dtype=torch.long).cumsum(0)
        self._starts, self._ends = (ends - torch.tensor(self.sizes)).to(dev), ends.to(dev)
        live = [i for i, m in enumerate(self.layers) if m.r > 0]
        self._lams = [self.layers[i].lam for i in live]
        self._buf = torch.zeros(sum(self.sizes), dtype=self.layers[0].lam.dtype, device=dev)
        views = self._buf.split(self.sizes)
        self._views = [views[i] for i in live]
        self._group: tuple[int, int] | None = None  # (id(optimizer), index of λ's param group)

    @torch.no_grad()
    def _flat_lams(self) -> torch.Tensor:
        """All gates as one flat tensor in module order (a rank-0 module holds none)."""
        return torch._C._nn.flatten_dense_tensors(self._lams)

    @torch.no_grad()
    def _write(self, flat: torch.Tensor) -> None:
        """λ ← flat, one multi-tensor copy for all modules."""
        self._buf.copy_(flat)
        torch._foreach_copy_(self._lams, self._views)

    def ranks(self) -> torch.Tensor:
        """Kept triplets per module (device tensor)."""
        return segment_sums(self.mask, self._starts, self._ends)

    def module_masks(self) -> list[torch.Tensor]:
        return list(self.mask.split(self.sizes))

    # ----- the algorithm ------------------------------------------------------------------------
    def threshold(self) -> torch.Tensor | None:
        """τ_t = ξ·η_t for the step just taken; None before the allocator has seen the optimizer's lr."""
        return None if self.lr is None else self.xi * self.lr

    @torch.no_grad()
    def prox(self, tau: torch.Tensor) -> torch.Tensor:
        """Soft-threshold every gate by τ in one flat op; returns the flat gates after it."""
        lam = soft_threshold(self._flat_lams(), tau)
        self._write(lam)
        return lam

    @torch.no_grad()
    def control(self, live: torch.Tensor, budget: int) -> None:
        """ξ ← ξ·ρ while the live count is above the budget, ξ/ρ while below (on the device)."""
        rho = self.xi_growth
        self.xi.mul_(torch.where(live > budget, rho, torch.where(live < budget, 1 / rho, 1.0)))

    @torch.no_grad()
    def finalize(self, lam: torch.Tensor) -> None:
        """Fix the final mask: targeted, the `target_total` largest |λ|; fixed ξ, the live gates."""
        if self.targeted:
            mask = torch.zeros_like(self.mask)
            mask[torch.topk(lam.abs(), self.target_total, sorted=False).indices] = True
            self.mask = mask
            self._write(lam * mask)
            self.final_total = self.target_total
        else:
            self.mask = lam != 0
            self.final_total = int(self.mask.sum())
        self.frozen = True
        if self.on_final is not None:
            self.on_final(self.final_total)

    @torch.no_grad()
    def apply_mask(self) -> None:
        """λ ← λ·mask (the optimizer revives pruned gates between steps, as it does AdaLoRA's)."""
        self._write(self._flat_lams() * self.mask)

    def step(self, update_importance: bool = True) -> Allocation:
        """Call once after each optimizer step. `update_importance=False`: the optimizer skipped this step
        (fp16 overflow), so there was no gradient step to take the proximal step of."""
        self.t += 1
        t, sch = self.t, self.schedule
        end = sch.total - sch.t_final
        budget, do_mask = sch.at(t, self.init_total, self.target_total)
        tau = self.threshold() if update_importance and sch.t_init < t <= end else None
        masked = not self.frozen
        if not self.frozen:
            lam = self.prox(tau) if tau is not None else self._flat_lams()
            if t >= end:
                self.finalize(lam)
            else:
                self.mask = lam != 0
                if self.targeted and do_mask and t > sch.t_init:
                    self.control(self.mask.sum(), budget)
        elif not self.shrunk:
            self.apply_mask()
        if not self.targeted or self.frozen:
            budget = self.final_total if self.frozen else int(self.mask.sum())
        phase = "init" if t <= sch.t_init else ("budget" if t < end else "final")
        return Allocation(t, budget, phase, masked, tau, self.mask, (self._starts, self._ends), self.names)

    # ----- the optimizer hand-off and the shrink -------------------------------------------------
    def _read_lr(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep the lr the optimizer will use at its next step (the group that holds the gates)."""
        if self._group is None or self._group[0] != id(optimizer):
            lam0 = next((m.lam for m in self.layers if m.r > 0), None)
            idx = next((i for i, g in enumerate(optimizer.param_groups) if any(p is lam0 for p in g["params"])), 0)
            self._group = (id(optimizer), idx)
        lr = optimizer.param_groups[self._group[1]]["lr"]
        self.lr = lr.detach().clone() if torch.is_tensor(lr) else float(lr)

    def shrink(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Physically remove the dead triplets (only once the final mask is fixed)."""
        if not self.frozen:
            raise RuntimeError("shrink is only allowed once the final mask is fixed (t >= T - t_f)")
        if self.shrunk:
            return
        swaps = shrink_layers(self.layers, self.module_masks())
        if optimizer is not None:
            remap_optimizer(optimizer, swaps)
        self.shrunk = True
        self.mask = torch.ones(sum(m.r for m in self.layers), dtype=torch.bool, device=self.mask.device)
        self._build_index()

    def maybe_shrink(self, optimizer: torch.optim.Optimizer | None) -> bool:
        """Read the next step's lr; with `shrink_at_final`, shrink once the final mask is fixed (True then)."""
        if optimizer is not None:
            self._read_lr(optimizer)
        if not (self.shrink_at_final and self.frozen and not self.shrunk):
            return False
        self.shrink(optimizer)
        if optimizer is not None:
            self._group = None  # the gates are new parameters now
            self._read_lr(optimizer)
        return True

    # ----- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: step, flags, mask, ξ, the coming lr, the final count."""
        return {
            "t": self.t, "frozen": self.frozen, "shrunk": self.shrunk, "names": list(self.names),
            "sizes": list(self.sizes), "mask": self.mask.clone(), "xi": float(self.xi),
            "lr": None if self.lr is None else float(self.lr), "final_total": self.final_total,
            "init_total": self.init_total, "target_total": self.target_total, "targeted": self.targeted,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state; a shrunk state shrinks the layers to match first (so call it before building the
        optimizer)."""
        if state["names"] != self.names:
            raise ValueError("allocator state: module names differ from the model's SVD adapters")
        if (state["init_total"], state["target_total"], state["targeted"]) != (self.init_total, self.target_total, self.targeted):
            raise ValueError("allocator state: budgets or variant differ from this run's configuration")
        dev = self.mask.device
        if state["shrunk"] and not self.shrunk:
            self.frozen = True  # recreate the shrink from the recorded ranks: the kept triplets come first
            self.mask = torch.zeros(self.init_total, dtype=torch.bool, device=dev)
            for mk, r in zip(self.module_masks(), state["sizes"]):
                mk[:r] = True
            self.shrink(None)
        if [m.r for m in self.layers] != list(state["sizes"]):
            raise ValueError("allocator state: adapter ranks differ from the saved ones")
        self.t, self.frozen, self.shrunk = state["t"], state["frozen"], state["shrunk"]
        self.mask = state["mask"].to(dev)
        self.xi = torch.tensor(state["xi"], device=dev)
        self.lr, self.final_total = state["lr"], state["final_total"]
        if self.frozen and self.on_final is not None:
            self.on_final(self.final_total)

