"""adarank.studies.stability on hand-made allocations, and its section and plots in `python -m adarank.report`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from adarank.studies import report, stability as st


def test_spearman_matches_scipy_with_ties_and_is_none_for_a_constant_side():
    assert st.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert st.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert st.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(3 / (2 * 3 ** 0.5))  # average ranks for the tie
    x, y = [3, 1, 2, 1, 0, 5], [2, 1, 2, 0, 1, 4]
    assert st.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert st.spearman([2, 2, 2], [1, 2, 3]) is None and st.spearman([1], [1]) is None


def test_jaccard_and_its_means_over_pairs_and_modules():
    assert st.jaccard([0, 1, 2], [1, 2, 3]) == 0.5 and st.jaccard([0], []) == 0.0 and st.jaccard([], []) is None
    # three seeds: two agree, the third is reversed -> pairs 1, -1, -1
    a, b, c = {"m0": 1, "m1": 2, "m2": 3}, {"m0": 1, "m1": 2, "m2": 3}, {"m0": 3, "m1": 2, "m2": 1}
    assert st.rank_agreement([a, b, c]) == pytest.approx(-1 / 3)
    assert st.rank_agreement([a]) is None
    kept = [{"m0": [0, 1], "m1": [], "m2": [2]}, {"m0": [0, 2], "m1": [], "m2": [2]}]
    assert st.module_jaccard(kept) == {"m0": pytest.approx(1 / 3), "m1": None, "m2": 1.0}
    assert st.triplet_agreement(kept) == pytest.approx((1 / 3 + 1) / 2)  # the undefined module is left out


def test_the_null_keeps_the_histogram_within_modules_of_one_size():
    seeds = [{"a": 3, "b": 0, "c": 1, "d": 2, "e": 1}, {"a": 0, "b": 2, "c": 4, "d": 0, "e": 1}]
    sizes = {"a": 4, "b": 4, "c": 4, "d": 2, "e": 2}  # d and e may only swap with each other
    names, ranks, kept = st.random_allocations(seeds, sizes, 50, np.random.default_rng(0))
    assert names == list("abcde") and ranks.shape == (50, 2, 5) and kept.shape == (50, 2, 5, 4)
    for s, observed in enumerate(seeds):
        want = [observed[n] for n in names]
        assert (np.sort(ranks[:, s, :3], -1) == sorted(want[:3])).all()
        assert (np.sort(ranks[:, s, 3:], -1) == sorted(want[3:])).all()
    assert len({tuple(r) for r in ranks[:, 0]}) > 1  # it does permute
    assert (kept.sum(-1) == ranks).all() and not kept[..., 3:, 2:].any()  # d and e have 2 slots
    assert len({tuple(np.flatnonzero(k)) for k in kept[:, 0, 0]}) > 1  # and draws different slots
    _, given, kept_given = st.random_allocations(seeds, sizes, 20, np.random.default_rng(0), permute=False)
    assert (given == [[s[n] for n in names] for s in seeds]).all() and (kept_given.sum(-1) == given).all()
    again = st.random_allocations(seeds, sizes, 5, np.random.default_rng(7))
    assert all((x == y).all() for x, y in zip(again[1:], st.random_allocations(seeds, sizes, 5, np.random.default_rng(7))[1:]))


def test_the_batched_statistics_equal_the_reference_ones_draw_by_draw():
    rng = np.random.default_rng(3)
    sizes = {f"m{i}": 3 + i % 3 for i in range(7)}
    seeds = [{n: int(rng.integers(0, sizes[n] + 1)) for n in sizes} for _ in range(4)]
    seeds.append({n: 1 for n in sizes})  # a constant seed: its pairs have no ρ
    names, ranks, kept = st.random_allocations(seeds, sizes, 30, rng)
    rho, jac = st.rank_agreement_draws(ranks), st.triplet_agreement_draws(kept)
    for d in range(30):
        as_ranks = [dict(zip(names, ranks[d, s].tolist())) for s in range(len(seeds))]
        as_kept = [{n: np.flatnonzero(kept[d, s, i]).tolist() for i, n in enumerate(names)} for s in range(len(seeds))]
        assert rho[d] == pytest.approx(st.rank_agreement(as_ranks))
        assert jac[d] == pytest.approx(st.triplet_agreement(as_kept))


def test_chance_levels_on_cases_with_known_answers():
    sizes = {f"m{i}": 2 for i in range(5)}
    # every module keeps 1 of 2 triplets in both seeds: a random pick agrees with probability 1/2, so the
    # expected Jaccard is 1/2 under both nulls; the ranks are constant, so there is no ρ
    ones = [{n: 1 for n in sizes}] * 2
    c = st.chance_levels(ones, sizes, draws=400, seed=1)
    assert c["spearman"] is None
    assert c["jaccard"] == pytest.approx(0.5, abs=0.05) and c["jaccard_given_ranks"] == pytest.approx(0.5, abs=0.05)
    # full modules always overlap completely
    assert st.chance_levels([{n: 2 for n in sizes}] * 3, sizes, draws=5)["jaccard_given_ranks"] == 1.0
    # two seeds with the same distinct ranks: a permutation matches them with probability 1/120, so ρ = 1 is
    # far above chance, whose mean is near 0
    sizes = {f"m{i}": 6 for i in range(5)}
    same = [{f"m{i}": i + 1 for i in range(5)}] * 2
    c = st.chance_levels(same, sizes, draws=600, seed=0, observed={"spearman": 1.0, "jaccard": 1.0})
    assert abs(c["spearman"]) < 0.1 and c["spearman_q95"] < 1.0
    assert c["spearman_p"] < 0.03 and c["jaccard_p"] == pytest.approx(1 / 601)
    assert c == st.chance_levels(same, sizes, draws=600, seed=0, observed={"spearman": 1.0, "jaccard": 1.0})


EVENTS = {"modules": ["a", "b", "c", "d"], "sizes": "3 3 3 3", "steps": [10, 20, 30, 40], "budgets": [12, 10, 8, 7],
          "ranks": ["3 3 3 3", "3 2 3 2", "2 1 3 2", "3 1 2 1"]}


def test_movement_over_the_schedule():
    m = st.movement(EVENTS)
    final = [3, 1, 2, 1]
    assert m["steps"] == [10, 20, 30, 40]
    assert m["rho_to_final"] == [None, pytest.approx(spearmanr([3, 2, 3, 2], final).statistic),
                                 pytest.approx(0.5), pytest.approx(1.0)]
    assert m["l1"] == [None, 2, 2, 3] and m["total_l1"] == 7
    assert m["forced_l1"] == 5 and m["reallocation"] == 2  # totals 12 -> 10 -> 8 -> 7; 2 moved between modules
    assert m["settle_step"] == 40  # 0.94 at step 20, but 0.5 at step 30
    assert st.movement({**EVENTS, "steps": [], "ranks": []})["settle_step"] is None


def _run(seed, final, kept, events=EVENTS):
    return {"seed": seed, "final_ranks": dict(zip("abcd", final)),
            "kept_triplets": dict(zip("abcd", kept)), "allocation_events": events}


def test_group_stability_puts_it_together():
    runs = [_run(1, [3, 1, 2, 1], ["0 1 2", "0", "0 2", "1"]), _run(0, [3, 1, 2, 1], ["0 1 2", "2", "0 1", "1"])]
    g = st.group_stability(runs, draws=50)
    assert (g["n"], g["n_kept"], g["seeds"]) == (2, 2, [0, 1])
    assert g["spearman"] == pytest.approx(1.0)
    assert g["module_jaccard"] == {"a": 1.0, "b": 0.0, "c": pytest.approx(1 / 3), "d": 1.0}
    assert g["jaccard"] == pytest.approx((1 + 0 + 1 / 3 + 1) / 4)
    assert set(g["chance"]) == {"spearman", "spearman_q95", "jaccard", "jaccard_q95", "jaccard_given_ranks",
                                "spearman_p", "jaccard_p"}
    assert len(g["movements"]) == 2 and g["movements"][0]["total_l1"] == 7
    one = st.group_stability(runs[:1], draws=5)
    assert one["spearman"] is None and one["jaccard"] is None and one["chance"] is None
    # a run without the new fields (an older results.json, PEFT's AdaLoRA) still has ranks to compare
    old = [{"seed": s, "final_ranks": dict(zip("abcd", r))} for s, r in ((0, [3, 1, 2, 1]), (1, [1, 2, 3, 1]))]
    g = st.group_stability(old, draws=5)
    assert g["spearman"] is not None and g["jaccard"] is None and g["chance"] is None and g["movements"] == []


def _write(root, seed, final, kept):
    run = root / f"adalora_seed{seed}"
    run.mkdir(parents=True)
    record = {"task": "mrpc", "method": "adalora", "model": "tiny", "budget": 2, "seed": seed, "metric": "f1",
              "value": 0.8, "lr": 1e-3, "budget_curve": [[10, 12], [40, 7]], **_run(seed, final, kept)}
    (run / "results.json").write_text(json.dumps(record))


def test_the_report_has_a_stability_section_and_plots(tmp_path):
    _write(tmp_path, 0, [3, 1, 2, 1], ["0 1 2", "2", "0 1", "1"])
    _write(tmp_path, 1, [3, 2, 1, 1], ["0 1 2", "0 2", "1", "1"])
    assert report.main([str(tmp_path)]) == 0
    md = (tmp_path / "summary.md").read_text()
    assert "## Allocation stability over seeds" in md and "### Movement over the schedule" in md
    section = md.split("## Allocation stability over seeds")[1].splitlines()
    row = next(line for line in section if line.startswith("| mrpc | adalora | 2 | 2 |"))
    rho = spearmanr([3, 1, 2, 1], [3, 2, 1, 1]).statistic
    assert row.startswith(f"| mrpc | adalora | 2 | 2 | {rho:.2f} |")  # ρ between the two seeds' final ranks
    assert "| 0.75 |" in row  # Jaccard: modules a 1, b 1/2, c 1/2, d 1
    moved = next(line for line in section if line.startswith("| mrpc | adalora | 2 | 2 | 4 |"))
    assert "| 7.0 | 5.0 | 2.0 | 0.94 | 40 |" in moved  # the first event's ranks are constant: ρ from the second
    assert (tmp_path / "stability.png").is_file() and (tmp_path / "movement_mrpc_adalora_r2.png").is_file()
    assert "![stability over seeds](stability.png)" in md
