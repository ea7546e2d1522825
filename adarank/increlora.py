"""IncreLoRA (Zhang et al. 2023, arXiv 2308.12043): start small and grow the rank of the most important modules.

Every module starts at a small rank (1 by default). Every ΔT steps of the growth window, the `top_h` modules
with the highest importance gain `grow_by` triplets each, until the total rank reaches the budget (the final
average rank × modules, resolved as adalora's is). The allocator decides in `step()`; the triplets are added
in `maybe_shrink(optimizer)`, the loop's parameter hand-off (the same one a shrink uses: the loop re-reads
the parameters, resets CUDA graphs and re-wraps DDP), with AdamW's moments of the new entries at zero.

The score follows the reference code (FeiyuZhang98/IncreLoRA, `loralib/increlora.py`), one number per module:
I = Σ|ΔW ⊙ ∂L/∂ΔW| / √(out·in), smoothed as AdaLoRA's is (Ī, Ū with β1, β2; score Ī·Ū). The reference reads
∂L/∂ΔW in a backward hook; we have only the gradients of P, λ and Q, which give the row sums of ΔW ⊙ ∂L/∂ΔW
exactly (Σ_j ΔW_ij G_ij = Σ_r P_ir ∂L/∂P_ir) and its column sums (from Q), not its elements. So I is taken as
(Σ_i |row_i| + Σ_j |col_j|) / (2√(out·in)): the abs after summing along one axis instead of per element.
Those sums run on one flat buffer of every module's P and Q: a fixed number of kernels however deep the
model, no per-module Python loop, and no host sync except at growth steps (which must resize parameters).

Where we differ from the reference, and why:
- the score's abs comes after a row/column sum (above); it is computed after the optimizer step from the
  accumulated, DDP-averaged gradients (the reference: in a hook, from the last micro-batch, per process), so
  every process chooses the same modules;
- no advance learning: the reference keeps one reserve triplet per module whose P, Q train (λ fixed at 1e-5)
  before it is added; ours start fresh (P, Q ~ N(0, 0.02), λ = 0, the reference's `advance_learn=False`);
- the scale stays α/r_init; the reference divides by the current rank, which rescales every existing triplet
  of a grown module (so its growth changes the function);
- exactly top_h modules grow (ties broken by position), the last ones by fewer triplets where the budget
  would otherwise be passed; the reference grows every module tied at the threshold, each by the full
  incre_rank_num (default target_rank / 2; ours `grow_by`, default 1 as in the issue), and can overshoot;
- a module's rank is capped at min(out, in), and growth happens only in (t_i, T − t_f]: the reference grows
  until the budget is reached, however long that takes;
- new entries join the existing parameters (AdamW moments zero, the parameter's step count) rather than a new
  parameter group with fresh step counts; the orthogonal regulariser sees the whole P and Q (the reference's,
  over one-triplet parameters, only normalises each triplet).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from . import importance as imp
from . import unallocated
from .allocation import Allocation
from .grow import grow_layers, pad_optimizer
from .layers import SVDLinear
from .schedule import Schedule

__all__ = ["IncreLoraAllocator", "check_growth", "growth_rounds"]


def growth_rounds(schedule: Schedule) -> int:
    """The growth steps of the window: t_i < t ≤ T − t_f with t a multiple of ΔT."""
    first, last, dt = schedule.t_init + 1, schedule.total - schedule.t_final, schedule.delta_t
    return max(0, last // dt - (first - 1) // dt)


def check_growth(schedule: Schedule, init_total: int, target_total: int, top_h: int, grow_by: int, n_modules: int) -> None:
    """The growth window can reach the budget (the runner's preflight calls this before any model loads)."""
    rounds = growth_rounds(schedule)
    most = rounds * min(top_h, n_modules) * grow_by
    if target_total - init_total > most:
        raise ValueError(f"method.top_h: {rounds} growth steps (every method.delta_t={schedule.delta_t} in the "
                         f"window) of top_h={top_h} x grow_by={grow_by} add at most {most} triplets, short of the "
                         f"{target_total - init_total} the budget needs; raise method.top_h or grow_by, or lower "
                         "method.delta_t")


class IncreLoraAllocator:
    """Rank growth over SVD adapters.

    Args:
        layers: (name, SVDLinear) pairs at their starting ranks, e.g. `inject.svd_adapters(model)`.
        schedule: the phases in optimizer steps; growth happens at multiples of ΔT in (t_i, T − t_f].
        target_total: the budget in triplets, reached exactly.
        top_h: modules that grow at each growth step (fewer at the last, so the budget is not exceeded).
        grow_by: triplets each chosen module gains (the reference's incre_rank_num).
        beta1, beta2: EMA coefficients of the sensitivity and its uncertainty, in [0, 1).
        seed: seeds the draws of the new triplets' P and Q (with the step, so a resumed run draws the same).

    It satisfies `adarank.allocation.Allocator`.
    """

    def __init__(self, layers: Sequence[tuple[str, SVDLinear]], schedule: Schedule, target_total: int, top_h: int = 10,
                 grow_by: int = 1, beta1: float = 0.85, beta2: float = 0.85, seed: int = 0) -> None:
        if not layers:
            raise ValueError("method.targets: the model has no SVD adapters to grow")
        for name, b in (("method.beta1", beta1), ("method.beta2", beta2)):
            if not 0 <= b < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {b}")
        if top_h < 1 or grow_by < 1:
            raise ValueError(f"method.{'top_h' if top_h < 1 else 'grow_by'}: must be >= 1, got {min(top_h, grow_by)}")
        self.names = [n for n, _ in layers]
        self.layers = [m for _, m in layers]
        self.schedule, self.top_h, self.grow_by = schedule, top_h, grow_by
        self.beta1, self.beta2, self.seed = beta1, beta2, seed
        self.init_total = sum(m.r for m in self.layers)
        self.target_total = target_total
        # a rank above min(out, in) adds nothing a smaller one cannot express
        self.caps = [min(m.out_features, m.in_features) for m in self.layers]
        if not self.init_total <= target_total <= sum(self.caps):
            raise ValueError(f"method.r: the budget {target_total} must be in [{self.init_total}, {sum(self.caps)}] "
                             "(the starting total rank, and the most the adapted matrices can hold)")
        check_growth(schedule, self.init_total, target_total, top_h, grow_by, len(self.layers))
        self.t = 0
        self.ranks = [m.r for m in self.layers]  # after this step's growth (the layers catch up in maybe_shrink)
        self._ema_ipt: torch.Tensor | None = None  # (n_modules,) Ī, then Ū
        self._ema_unc: torch.Tensor | None = None
        self._build_index()
        unallocated.attach(self.layers)  # these adapters are allocated now: no warning that they are not

    # ----- bookkeeping ---------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(self.ranks)

    def _build_index(self) -> None:
        """The flat layout of every P then every Q, and the index vectors (built on the host, moved once) that
        make each row of P and each column of Q one contiguous run of r entries."""
        dev = self.layers[0].lam.device
        r = np.array([m.r for m in self.layers])
        out = np.array([m.out_features for m in self.layers])
        inn = np.array([m.in_features for m in self.layers])
        self._params = [m.P for m in self.layers] + [m.Q for m in self.layers]
        p_numel = int((out * r).sum())
        q_off = p_numel + np.concatenate([[0], np.cumsum(inn * r)[:-1]])
        # Q (r, in) is row-major: its column j is entries j, j + in, ..., read in that order
        cols = [q_off[k] + (np.arange(r[k])[None, :] * inn[k] + np.arange(inn[k])[:, None]).ravel() for k in range(len(r))]
        perm = np.concatenate([np.arange(p_numel)] + cols)
        lengths = np.concatenate([np.repeat(r, out), np.repeat(r, inn)])  # every P row, then every Q column
        ends = np.cumsum(lengths)
        line_ends = np.concatenate([np.cumsum(out), out.sum() + np.cumsum(inn)])  # lines per module, P then Q
        as_t = lambda a: torch.as_tensor(a, dtype=torch.long).to(dev)  # noqa: E731
        self._perm, self._ends, self._starts = as_t(perm), as_t(ends), as_t(ends - lengths)
        n = len(r)
        self._mod_ends, self._mod_starts = as_t(line_ends), as_t(line_ends - np.concatenate([out, inn]))
        self._n = n
        self._norm = torch.as_tensor(1.0 / (2.0 * np.sqrt(out * inn.astype(np.float64))), dtype=torch.float64).to(dev)
        self._mask_index()

    def _mask_index(self) -> None:
        """The Allocation's mask: each module's capacity (its cap) as a run, its first r entries kept; so the
        mask alone tells each module's rank (train.check_masks compares it across processes)."""
        mask = np.zeros(sum(self.caps), dtype=bool)
        starts = np.concatenate([[0], np.cumsum(self.caps)[:-1]])
        for s, r in zip(starts, self.ranks):  # host work at growth steps only
            mask[s : s + r] = True
        dev = self.layers[0].lam.device
        self.mask = torch.from_numpy(mask).to(dev)
        self._bounds = (torch.as_tensor(starts, dtype=torch.long).to(dev),
                        torch.as_tensor(np.cumsum(self.caps), dtype=torch.long).to(dev))

    # ----- the algorithm ------------------------------------------------------------------------
    @torch.no_grad()
    def module_sensitivity(self) -> torch.Tensor:
        """I per module (float64, module order): Σ|row sums| + Σ|column sums| of ΔW ⊙ ∂L/∂ΔW over 2√(out·in)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        flat = torch._C._nn.flatten_dense_tensors
        prod = (flat(self._params) * flat(grads)).index_select(0, self._perm).double()
        cs = torch.cat([prod.new_zeros(1), prod.cumsum(0)])  # float64: the differences keep their precision
        lines = (cs[self._ends] - cs[self._starts]).abs_()
        cl = torch.cat([lines.new_zeros(1), lines.cumsum(0)])
        per = cl[self._mod_ends] - cl[self._mod_starts]  # (2n,): the P rows, then the Q columns, of each module
        return (per[: self._n] + per[self._n :]) * self._norm

    @torch.no_grad()
    def update_importance(self) -> None:
        ipt = self.module_sensitivity()
        if self._ema_ipt is None:
            self._ema_ipt, self._ema_unc = torch.zeros_like(ipt), torch.zeros_like(ipt)
        imp.smooth_(self._ema_ipt, ipt, self.beta1)
        imp.uncertainty_(self._ema_unc, ipt, self._ema_ipt, self.beta2)

    def scores(self) -> torch.Tensor:
        """Ī·Ū per module (zeros before any update)."""
        if self._ema_ipt is None:
            return torch.zeros(self._n, dtype=torch.float64, device=self.mask.device)
        return self._ema_ipt * self._ema_unc

    @torch.no_grad()
    def choose(self) -> tuple[list[int], torch.Tensor]:
        """This growth step's triplets per module, and the score threshold (the last chosen module's score).

        The top_h highest scores among the modules below their cap, ties broken by position (the reference
        grows every module tied at the threshold, which can exceed top_h); the last ones chosen get fewer
        when the budget would otherwise be exceeded.
        """
        room = torch.as_tensor([c - r for c, r in zip(self.caps, self.ranks)], device=self.mask.device)
        s = torch.where(room > 0, self.scores(), torch.full_like(self.scores(), -math.inf))
        left = self.target_total - self.total
        h = min(self.top_h, int((room > 0).sum()), math.ceil(left / self.grow_by))
        top = torch.topk(s, h)  # sorted, highest first
        counts = [0] * self._n
        for i, k in enumerate(top.indices.tolist()):
            counts[k] = min(self.grow_by, self.caps[k] - self.ranks[k], left)
            left -= counts[k]
        return counts, top.values[-1]

    def step(self, update_importance: bool = True) -> Allocation:
        """Advance one optimizer step: update the importance while growing; at a growth step choose the modules
        (the layers grow in `maybe_shrink`). Returns the ranks after this step's growth."""
        self.t += 1
        t, sch = self.t, self.schedule
        growing = self.total < self.target_total
        threshold, grew = None, False
        if growing and update_importance:
            self.update_importance()
        if growing and sch.t_init < t <= sch.total - sch.t_final and t % sch.delta_t == 0:
            counts, threshold = self.choose()
            self._pending = counts
            self.ranks = [r + c for r, c in zip(self.ranks, counts)]
            self._mask_index()
            grew = True
        if self.total >= self.target_total:
            self._ema_ipt = self._ema_unc = None  # as the reference, no scores once the budget is reached
        phase = "init" if t <= sch.t_init else ("budget" if self.total < self.target_total or grew else "final")
        return Allocation(t, self.total, phase, grew, threshold, self.mask, self._bounds, self.names)

    def maybe_shrink(self, optimizer: torch.optim.Optimizer | None) -> bool:
        """The parameter hand-off, here a growth: add the triplets chosen at this step (AdamW moments of the new
        entries at zero); True when parameters were replaced."""
        counts = getattr(self, "_pending", None)
        if not counts:
            return False
        growths = grow_layers(self.layers, counts, seed=self.seed * 1_000_003 + self.t)
        if optimizer is not None:
            pad_optimizer(optimizer, growths)
        self._pending = None
        self._build_index()
        return True

    # ----- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Step, ranks (those of the layers, and those decided), the EMAs: a resumed run re-grows, then loads."""
        return {"t": self.t, "names": list(self.names), "ranks": list(self.ranks), "sizes": [m.r for m in self.layers],
                "ema_ipt": None if self._ema_ipt is None else self._ema_ipt.clone(),
                "ema_unc": None if self._ema_unc is None else self._ema_unc.clone(),
                "init_total": self.init_total, "target_total": self.target_total}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state, first growing the layers to the saved sizes (their values come with the model's
        weights); build the optimizer after this call so that it holds the grown parameters."""
        if state["names"] != self.names:
            raise ValueError("allocator state: module names differ from the model's SVD adapters")
        if state["init_total"] != self.init_total or state["target_total"] != self.target_total:
            raise ValueError("allocator state: budgets differ from this run's configuration")
        extra = [s - m.r for s, m in zip(state["sizes"], self.layers)]
        if any(k < 0 for k in extra):
            raise ValueError("allocator state: an adapter is larger than the checkpoint's")
        grow_layers(self.layers, extra, seed=0)  # placeholders: the checkpoint's weights overwrite them
        self.t, self.ranks = state["t"], list(state["ranks"])
        pending = [r - m.r for r, m in zip(self.ranks, self.layers)]
        self._pending = pending if any(pending) else None
        dev = self.layers[0].lam.device
        self._ema_ipt = None if state["ema_ipt"] is None else state["ema_ipt"].to(dev)
        self._ema_unc = None if state["ema_unc"] is None else state["ema_unc"].to(dev)
        self._build_index()
