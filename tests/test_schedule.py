"""adarank.schedule: the cubic budget schedule (AdaLoRA eq. 12) and budget resolution, and config errors."""

from __future__ import annotations

import pytest

import adarank
from adarank.schedule import Budget, Schedule, budget_at, make_schedule, resolve_budget

from conftest import svd_bert

# b0 = 100, bT = 20, t_i = 10, t_f = 10, T = 110: the budgeting phase is 90 steps long.
B0, BT, TI, TF, T = 100, 20, 10, 10, 110


@pytest.mark.parametrize(
    "step,expected",
    [
        (0, (100, False)),
        (10, (100, False)),  # t ≤ t_i: initial budget, no masking
        (11, (97, True)),  # 20 + 80·(89/90)³ = 97.36 → 97
        (40, (43, True)),  # 20 + 80·(2/3)³ = 43.70 → 43
        (55, (30, True)),  # 20 + 80·(1/2)³ = 30
        (99, (20, True)),  # 20 + 80·(1/90)³ = 20.0001 → 20
        (100, (20, True)),  # t = T − t_f: the cubic reaches b_T
        (101, (20, True)),  # final phase: b_T, mask every step
        (500, (20, True)),
    ],
)
def test_budget_at_phases_and_cubic_values(step, expected):
    assert budget_at(step, B0, BT, TI, TF, T) == expected


def test_budget_at_is_nonincreasing_and_hits_both_ends():
    budgets = [budget_at(t, B0, BT, TI, TF, T)[0] for t in range(0, T + 1)]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert budgets[0] == budgets[TI] == B0 and budgets[T - TF] == budgets[-1] == BT
    assert budgets[TI + 1] < B0


@pytest.mark.parametrize("delta_t", [1, 3, 7])
def test_delta_t_masks_every_delta_t_steps_in_the_middle_only(delta_t):
    for t in range(0, T + 5):
        _, mask = budget_at(t, B0, BT, TI, TF, T, delta_t)
        if t <= TI:
            assert not mask
        elif t <= T - TF:
            assert mask == (t % delta_t == 0), t
        else:
            assert mask


def test_schedule_at_delegates():
    sch = Schedule(total=T, t_init=TI, t_final=TF, delta_t=3)
    assert [sch.at(t, B0, BT) for t in range(T + 2)] == [budget_at(t, B0, BT, TI, TF, T, 3) for t in range(T + 2)]


@pytest.mark.parametrize(
    "args,expected",
    [
        ((100, 0.1, 0.2, 1), Schedule(100, 10, 20, 1)),
        ((20, 0.1, 0.25, 2), Schedule(20, 2, 5, 2)),
        ((10, 0.0, 0.0, 1), Schedule(10, 0, 0, 1)),
        ((7, 0.3, 0.3, 1), Schedule(7, 2, 2, 1)),  # fractions round to the nearest step
        ((2, 0.0, 0.0, 1), Schedule(2, 0, 0, 1)),  # the smallest legal schedule: one importance update first
    ],
)
def test_make_schedule(args, expected):
    assert make_schedule(*args) == expected


@pytest.mark.parametrize(
    "args,field",
    [
        ((10, 0.5, 0.5, 1), "method.init_frac/method.final_frac"),  # T = t_i + t_f
        ((2, 0.0, 0.5, 1), "method.final_frac"),  # final allocation at step 1, before any importance update
        ((1, 0.0, 0.0, 1), "method.final_frac"),
        ((10, 0.6, 0.5, 1), "method.init_frac/method.final_frac"),  # T < t_i + t_f
        ((10, 1.0, 0.0, 1), "method.init_frac"),
        ((10, -0.1, 0.0, 1), "method.init_frac"),
        ((10, 0.0, 1.0, 1), "method.final_frac"),
        ((10, 0.0, -0.5, 1), "method.final_frac"),
        ((10, 0.1, 0.1, 0), "method.delta_t"),
        ((10, 0.1, 0.1, -2), "method.delta_t"),
        ((0, 0.1, 0.1, 1), "schedule.total_steps"),
        ((-5, 0.1, 0.1, 1), "schedule.total_steps"),
    ],
)
def test_make_schedule_errors_name_the_field(args, field):
    with pytest.raises(ValueError) as e:
        make_schedule(*args)
    assert str(e.value).startswith(field + ":")


SHAPES = [(16, 16)] * 4 + [(16, 32), (32, 16)]  # (in, out); triplet costs 33 ×4, 49 ×2: mean 115/3


@pytest.mark.parametrize(
    "kwargs,expected",
    [
        ({"target_rank": 2}, Budget(init_rank=3, init_total=18, target_total=12)),
        ({"target_rank": 4}, Budget(init_rank=6, init_total=36, target_total=24)),
        ({"target_rank": 3}, Budget(init_rank=5, init_total=30, target_total=18)),  # ceil(4.5)
        ({"target_rank": 1.5}, Budget(init_rank=3, init_total=18, target_total=9)),  # ceil(2.25)
        ({"target_total_rank": 10}, Budget(init_rank=3, init_total=18, target_total=10)),  # ceil(1.5·10/6)=ceil(2.5)
        ({"target_total_rank": 12}, Budget(init_rank=3, init_total=18, target_total=12)),  # exactly 3.0, not 4
        ({"target_params": 1000}, Budget(init_rank=7, init_total=42, target_total=26)),  # 1000 // (115/3) = 26
        ({"target_rank": 2, "init_rank": 8}, Budget(init_rank=8, init_total=48, target_total=12)),
        ({"target_rank": 2, "init_ratio": 2.0}, Budget(init_rank=4, init_total=24, target_total=12)),
        ({"target_rank": 2, "init_ratio": 1.0}, Budget(init_rank=2, init_total=12, target_total=12)),
    ],
)
def test_resolve_budget(kwargs, expected):
    assert resolve_budget(SHAPES, **kwargs) == expected


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({}, "method.r/target_total_rank/target_params"),  # no target
        ({"target_rank": 2, "target_total_rank": 12}, "method.r/target_total_rank/target_params"),
        ({"target_rank": 2, "target_params": 500}, "method.r/target_total_rank/target_params"),
        ({"target_rank": -1}, "method.r"),
        ({"target_rank": 0}, "method.r"),
        ({"target_total_rank": 0}, "method.r"),  # zero budget
        ({"target_total_rank": -4}, "method.r"),
        ({"target_params": 30}, "method.r"),  # less than one triplet
        ({"target_rank": 4, "init_rank": 3}, "method.r"),  # target > initial
        ({"target_rank": 2, "init_ratio": 0.9}, "method.init_ratio"),
        ({"target_rank": 2, "init_rank": 0}, "method.init_rank"),
    ],
)
def test_resolve_budget_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError) as e:
        resolve_budget(SHAPES, **kwargs)
    assert str(e.value).startswith(field + ":")


def test_resolve_budget_without_matrices():
    with pytest.raises(ValueError, match="method.targets"):
        resolve_budget([], target_rank=2)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"beta1": 1.0}, "method.beta1"),
        ({"beta1": -0.1}, "method.beta1"),
        ({"beta2": 1.5}, "method.beta2"),
        ({"score": "fisher"}, "method.score"),
        ({"target_total": 0}, "method.r"),
        ({"target_total": 45}, "method.r"),  # 11 modules × r 4 = 44
    ],
)
def test_allocator_config_errors(kwargs, field):
    model, _ = svd_bert()
    layers = adarank.svd_adapters(model)
    args = {"target_total": 22} | kwargs
    with pytest.raises(ValueError) as e:
        adarank.RankAllocator(layers, Schedule(10, 1, 1, 1), **args)
    assert str(e.value).startswith(field + ":")
    with pytest.raises(ValueError, match="method.targets"):
        adarank.RankAllocator([], Schedule(10, 1, 1, 1), 1)
    adarank.RankAllocator(layers, Schedule(10, 1, 1, 1), 22, beta1=0.0, beta2=0.0)  # β = 0 is legal
