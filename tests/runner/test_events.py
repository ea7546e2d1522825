"""adarank.runner.events: the ranks at every masking event and the final kept triplets, in results.json (a
fixed-rank run records none: tests/runner/test_allocation_controls.py)."""

from __future__ import annotations

import pytest
import torch

from adarank.allocation import Allocation
from adarank.inject import svd_adapters
from adarank.runner import events
from adarank.schedule import budget_at

from e2e import capture_models, one_thread, run, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

# the tiny random BERT at method.r=2: 12 modules from rank 3; 20 steps with init_frac 0.1, final_frac 0.2
N_MODULES, INIT_RANK, T, T_INIT, T_FINAL = 12, 3, 20, 2, 4


def test_encoding_is_one_string_and_round_trips():
    assert events.encode([3, 0, 12]) == "3 0 12" and events.decode("3 0 12") == [3, 0, 12]
    assert events.decode(events.encode([])) == []


def _allocation(step, mask, phase="budget", masked=True):
    return Allocation.from_mask(step, int(sum(mask)), torch.tensor(mask), [3, 2], ["a", "b"], phase, masked)


def test_only_masking_events_are_recorded_and_the_final_one_keeps_its_triplets():
    history = {}
    events.record(history, None)
    events.record(history, _allocation(1, [True] * 5, masked=False))
    assert events.results_fields(history) == {"allocation_events": None, "kept_triplets": None}
    events.record(history, _allocation(3, [True, False, True, True, True]))
    events.record(history, _allocation(4, [True, False, True, True, True], masked=False))
    events.record(history, _allocation(6, [False, False, True, False, True], phase="final"))
    assert events.results_fields(history) == {
        "allocation_events": {"modules": ["a", "b"], "sizes": "3 2", "steps": [3, 6], "budgets": [4, 2], "ranks": ["2 2", "1 1"]},
        "kept_triplets": {"a": "2", "b": "1"},
    }


def test_a_tiny_adalora_run_records_its_events_and_kept_triplets(tmp_path, monkeypatch):
    models = capture_models(monkeypatch)
    cfg = tiny_config(tmp_path, "method=adalora", "method.shrink=false", "method.delta_t=3")
    res = run(cfg, tmp_path / "out")
    ev, kept = res["allocation_events"], res["kept_triplets"]
    masking = [t for t in range(1, T + 1) if t < T - T_FINAL and budget_at(t, 36, 24, T_INIT, T_FINAL, T, 3)[1]]
    assert len(masking) >= 3 and ev["steps"] == masking + [T - T_FINAL]  # the budgeting phase's events, then the final one
    assert ev["budgets"] == [dict(res["budget_curve"])[t] for t in ev["steps"]] and ev["budgets"][-1] == 24
    assert events.decode(ev["sizes"]) == [INIT_RANK] * N_MODULES
    ranks = [events.decode(r) for r in ev["ranks"]]
    assert all(len(r) == N_MODULES and sum(r) <= b for r, b in zip(ranks, ev["budgets"]))
    assert dict(zip(ev["modules"], ranks[-1])) == res["final_ranks"]
    # without a shrink the masked λ are exactly zero: the kept indices are where λ is not
    (model,) = models
    assert {n: events.decode(kept[n]) for n in kept} == {
        n: m.lam.detach().nonzero().flatten().tolist() for n, m in svd_adapters(model)}
    assert (tmp_path / "out" / "results.json").stat().st_size < 60_000
