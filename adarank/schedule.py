"""The budget schedule (AdaLoRA eq. 12) and budget resolution, as pure functions.

Steps t count completed optimizer steps, 1..T. Phases: t ≤ t_i keeps the initial budget b_0;
t_i < t ≤ T − t_f decays cubically to b_T, masking every ΔT steps; t > T − t_f holds b_T and masks
every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["budget_at", "Schedule", "make_schedule", "resolve_budget", "Budget"]


def budget_at(step: int, b0: int, bT: int, t_init: int, t_final: int, total: int, delta_t: int = 1) -> tuple[int, bool]:
    """Budget at `step` and whether to mask at this step.

    b(t) = b_T + (b_0 − b_T)·(1 − (t − t_i)/(T − t_f − t_i))³ in the middle phase, truncated to an
    integer as PEFT does, so the two schedules agree exactly.
    """
    if step <= t_init:
        return b0, False
    if step > total - t_final:
        return bT, True
    mul = 1 - (step - t_init) / (total - t_final - t_init)
    return int((b0 - bT) * (mul**3) + bT), step % delta_t == 0


@dataclass(frozen=True)
class Schedule:
    """Resolved schedule in steps. Built by `make_schedule`, which validates it."""

    total: int
    t_init: int
    t_final: int
    delta_t: int

    def at(self, step: int, b0: int, bT: int) -> tuple[int, bool]:
        return budget_at(step, b0, bT, self.t_init, self.t_final, self.total, self.delta_t)


def make_schedule(total_steps: int, init_frac: float, final_frac: float, delta_t: int = 1) -> Schedule:
    """Turn phase fractions of the total into step counts; ValueError names the bad field."""
    if total_steps < 1:
        raise ValueError(f"schedule.total_steps: must be >= 1, got {total_steps} (check epochs and batch size)")
    for name, f in (("method.init_frac", init_frac), ("method.final_frac", final_frac)):
        if not 0 <= f < 1:
            raise ValueError(f"{name}: must be in [0, 1), got {f}")
    if delta_t < 1:
        raise ValueError(f"method.delta_t: must be >= 1, got {delta_t}")
    t_init, t_final = round(init_frac * total_steps), round(final_frac * total_steps)
    if total_steps - t_final - t_init < 1:
        raise ValueError(
            f"method.init_frac/method.final_frac: no budgeting phase is left "
            f"(t_i={t_init} + t_f={t_final} >= T={total_steps}); lower them or train longer"
        )
    if total_steps - t_final < 2:
        raise ValueError(
            f"method.final_frac: the final allocation would come at step {total_steps - t_final}, before any "
            "importance was measured; lower it or train longer"
        )
    return Schedule(total=total_steps, t_init=t_init, t_final=t_final, delta_t=delta_t)


@dataclass(frozen=True)
class Budget:
    """Initial rank per matrix and the total budgets (in triplets) at the start and the end."""

    init_rank: int
    init_total: int
    target_total: int


def resolve_budget(
    shapes: Sequence[tuple[int, int]],
    target_rank: float | None = None,
    target_total_rank: int | None = None,
    target_params: int | None = None,
    init_rank: int | None = None,
    init_ratio: float = 1.5,
) -> Budget:
    """Resolve the final budget from exactly one of: average rank, total rank, adapter parameters.

    `shapes` are the (in, out) of the adapted matrices. A parameter target is converted with the mean
    cost of one triplet, d + k + 1 (column of P, row of Q, λ). The initial rank defaults to
    ceil(init_ratio × average target rank), the paper's 1.5×.
    """
    n = len(shapes)
    if n == 0:
        raise ValueError("method.targets: no adapted matrices, so there is no budget to allocate")
    given = [x is not None for x in (target_rank, target_total_rank, target_params)]
    if sum(given) != 1:
        raise ValueError("method.r/target_total_rank/target_params: give exactly one")
    if target_rank is not None:
        if target_rank <= 0:
            raise ValueError(f"method.r: must be > 0, got {target_rank}")
        total = round(target_rank * n)
    elif target_total_rank is not None:
        total = int(target_total_rank)
    else:
        cost = sum(d + k + 1 for d, k in shapes) / n
        total = int(target_params // cost)
    if total < 1:
        raise ValueError(f"method.r: the final budget resolves to {total} triplets; it must be >= 1")
    if init_ratio < 1:
        raise ValueError(f"method.init_ratio: must be >= 1, got {init_ratio}")
    if init_rank is None:
        init_rank = max(1, math.ceil(init_ratio * total / n - 1e-9))
    if init_rank < 1:
        raise ValueError(f"method.init_rank: must be >= 1, got {init_rank}")
    init_total = init_rank * n
    if total > init_total:
        raise ValueError(
            f"method.r: the final budget ({total} triplets) exceeds the initial one "
            f"({init_total} = init_rank {init_rank} x {n} matrices); raise method.init_rank"
        )
    return Budget(init_rank=init_rank, init_total=init_total, target_total=total)
