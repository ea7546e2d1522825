"""The allocation's course, for results.json: the per-module rank at every masking event, and the triplets the
final mask keeps.

The loop calls `record(history, allocation)` after each optimizer step; the events go into the loop's history,
so a checkpoint carries them and a resumed run continues the list. `results_fields(history)` is what
results.json adds:

- ``allocation_events``: ``{"modules": [name, ...], "sizes": "n_1 n_2 ...", "steps": [step, ...],
  "budgets": [budget, ...], "ranks": ["r_1 r_2 ...", ...]}``: each module's number of triplets (its initial
  rank) once, then one entry per masking event (every ΔT steps of the budgeting phase, and
  the final allocation at T - t_f), each event's ranks one space-separated string in ``modules`` order;
- ``kept_triplets``: ``{name: "i j ..."}``, the indices (0 .. r_init - 1) of the triplets the final mask
  keeps in each module, in increasing order ("" for a module pruned to rank 0).

The numbers are strings because results.json is indented JSON, where a list puts each number on its own line:
a run of 36 modules and 100 events would spend some 50 kB on its events instead of 10. `decode` turns one back
into a list of ints. Only allocators that report their masking events (`Allocation.masked`) have events: ours
does; PEFT's wrapper does not (its masks are PEFT's internal state), so its runs record none.

Each event reads the ranks on the host: one sync every ΔT steps, no more often than the loop's logging.
"""

from __future__ import annotations

from typing import Any

from ..allocation import Allocation

__all__ = ["record", "results_fields", "decode", "encode"]

EVENTS, KEPT = "allocation_events", "kept_triplets"


def encode(values: list[int]) -> str:
    """Ints as one space-separated string (compact in indented JSON)."""
    return " ".join(str(int(v)) for v in values)


def decode(text: str) -> list[int]:
    """The ints of an `encode`d string ("" is the empty list)."""
    return [int(v) for v in text.split()]


def record(history: dict[str, Any], allocation: Allocation | None) -> None:
    """Append a masking event's per-module ranks; at the final allocation, also the kept triplets."""
    if allocation is None or not allocation.masked:
        return
    events = history.get(EVENTS)
    if events is None:
        sizes = (allocation.bounds[1] - allocation.bounds[0]).tolist()
        events = history[EVENTS] = {"modules": list(allocation.names), "sizes": encode(sizes), "steps": [],
                                    "budgets": [], "ranks": []}
    events["steps"].append(int(allocation.step))
    events["budgets"].append(int(allocation.budget))
    events["ranks"].append(encode(allocation.ranks.tolist()))
    if allocation.phase == "final":
        # the mask of this step is the final one: the allocator never mutates a mask it handed out, so a
        # shrink in the same step (which renumbers the triplets) leaves it as it was
        mask = allocation.mask.cpu()
        starts, ends = (b.tolist() for b in allocation.bounds)
        history[KEPT] = {name: encode(mask[s:e].nonzero().flatten().tolist())
                         for name, s, e in zip(allocation.names, starts, ends)}


def results_fields(history: dict[str, Any]) -> dict[str, Any]:
    """results.json's ``allocation_events`` and ``kept_triplets`` (null for a run without masking events)."""
    return {EVENTS: history.get(EVENTS), KEPT: history.get(KEPT)}
