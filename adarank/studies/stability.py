"""Allocation stability: do the seeds of one adaptive (task, budget, lr) put the rank in the same places, more
than chance would, and how does the allocation move over the schedule?

Inputs are what results.json records (``adarank.runner.events``): ``final_ranks`` (module -> rank),
``kept_triplets`` (module -> the indices of the triplets the final mask keeps) and ``allocation_events`` (the
per-module ranks at every masking event, with the module sizes, i.e. the initial ranks).

Measures, for the runs (seeds) of one group:

- **Rank agreement**: Spearman's ρ between two seeds' final per-module ranks (ties get average ranks; a
  constant rank vector has no ρ and its pairs are left out), averaged over all pairs of seeds.
- **Triplet agreement**: per module, the Jaccard overlap |K_a ∩ K_b| / |K_a ∪ K_b| of two seeds' kept triplet
  index sets (undefined, and left out, when both are empty), averaged over pairs of seeds; then over modules.
  A triplet index names the same (P column, λ entry, Q row) slot in every seed, but the slots start from
  each seed's own random P and Q (λ from zero), so nothing ties slot j of one seed to slot j of another:
  agreement at the given-ranks chance level below is what agreeing ranks alone give; agreement beyond it means
  a systematic preference for some slots (e.g. the final mask's tie-break by position), not shared features.
- **Chance levels**, from `draws` random allocations per seed, seeded (`seed`), so the same inputs give the
  same numbers:
  - *permuted histogram* (the null for both measures): each seed's per-module ranks are permuted uniformly at
    random over the modules of the same size (the multiset of ranks, i.e. the rank histogram, and the total
    are kept; where the rank goes is random), and each module's kept triplets are a uniform random subset of
    that rank out of its triplets. The table gives the mean of the statistic over draws, its 95th percentile,
    and p = (1 + #draws with a statistic >= the observed) / (1 + draws), one-sided.
  - *given ranks* (Jaccard only): each seed keeps its observed per-module ranks and only the kept indices are
    random: the overlap that the rank agreement alone implies.
- **Movement over the schedule**, per run: at each masking event, ρ between the event's per-module ranks and
  the final allocation's (the last event), and the L1 change Σ|r_e - r_{e-1}| from the previous event; the
  total L1 splits into the part the shrinking budget forces, Σ|Σr_e - Σr_{e-1}|, and the rest (rank moved
  between modules: *reallocation*). `settle_step`: the first event from which ρ with the final stays >= 0.9.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import numpy as np

__all__ = ["spearman", "jaccard", "rank_agreement", "module_jaccard", "triplet_agreement", "random_allocations",
           "rank_agreement_draws", "triplet_agreement_draws", "chance_levels", "movement", "group_stability", "decode", "SETTLED"]

SETTLED = 0.9  # ρ with the final allocation from which a run counts as settled


def decode(text: str) -> list[int]:
    """The ints of results.json's space-separated strings (``adarank.runner.events.encode``)."""
    return [int(v) for v in text.split()]


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's ρ (average ranks for ties); None when either side is constant or shorter than 2."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    from scipy.stats import rankdata  # lazy: scipy.stats takes a while to import

    rx, ry = rankdata(x), rankdata(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def jaccard(a: Sequence[int], b: Sequence[int]) -> float | None:
    """|A ∩ B| / |A ∪ B|; None when both are empty."""
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else None


def _mean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def rank_agreement(ranks_by_seed: Sequence[Mapping[str, float]]) -> float | None:
    """Mean over pairs of seeds of ρ between their per-module ranks (on the modules both have)."""
    pairs = []
    for a, b in combinations(ranks_by_seed, 2):
        names = [n for n in a if n in b]
        pairs.append(spearman([a[n] for n in names], [b[n] for n in names]))
    return _mean(pairs)


def module_jaccard(kept_by_seed: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, float | None]:
    """Per module (the first seed's order): the mean over pairs of seeds of the Jaccard overlap of kept triplets."""
    names = [n for n in kept_by_seed[0] if all(n in k for k in kept_by_seed)] if kept_by_seed else []
    return {n: _mean([jaccard(a[n], b[n]) for a, b in combinations(kept_by_seed, 2)]) for n in names}


def triplet_agreement(kept_by_seed: Sequence[Mapping[str, Sequence[int]]]) -> float | None:
    """`module_jaccard` averaged over modules."""
    return _mean(list(module_jaccard(kept_by_seed).values()))


def random_allocations(ranks_by_seed: Sequence[Mapping[str, int]], sizes: Mapping[str, int], draws: int,
                       rng: np.random.Generator, permute: bool = True) -> tuple[list[str], np.ndarray, np.ndarray]:
    """`draws` draws of the null for every seed at once: (module names, ranks (draws, seeds, modules), kept
    (draws, seeds, modules, max size) boolean). `permute`: each seed's ranks are permuted over the modules of
    the same size (the permuted-histogram null); else each module keeps its rank (given ranks). The kept
    triplets of a module are a uniform random subset of that many of its `sizes[name]` triplets."""
    names = [n for n in ranks_by_seed[0] if all(n in r for r in ranks_by_seed)]
    observed = np.array([[r[n] for n in names] for r in ranks_by_seed])  # (seeds, modules)
    n_of = np.array([sizes[n] for n in names])
    ranks = np.broadcast_to(observed, (draws, *observed.shape)).copy()
    if permute:
        for size in np.unique(n_of):
            cols = np.flatnonzero(n_of == size)
            order = rng.random((draws, len(ranks_by_seed), len(cols))).argsort(-1)  # a random permutation each
            ranks[..., cols] = np.take_along_axis(observed[None, :, cols].repeat(draws, 0), order, -1)
    # a uniform k-subset of n slots: the k slots with the smallest random keys (padding slots never win)
    keys = rng.random((*ranks.shape, n_of.max()))
    keys[..., np.arange(n_of.max())[None, :] >= n_of[:, None]] = np.inf
    kept = keys.argsort(-1).argsort(-1) < ranks[..., None]
    return names, ranks, kept


def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The (first, second) seed index of every pair of `n` seeds."""
    pairs = np.array(list(combinations(range(n), 2)), dtype=int).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean over `axis` ignoring NaN; NaN where all are NaN (quietly, unlike np.nanmean)."""
    n = (~np.isnan(x)).sum(axis)
    return np.where(n > 0, np.nansum(x, axis) / np.maximum(n, 1), np.nan)


def rank_agreement_draws(ranks: np.ndarray) -> np.ndarray:
    """`rank_agreement` of each draw of (draws, seeds, modules) ranks: (draws,), NaN where no pair has a ρ."""
    from scipy.stats import rankdata  # lazy: scipy.stats takes a while to import

    r = rankdata(ranks, axis=-1)
    z = r - r.mean(-1, keepdims=True)
    norm = np.sqrt((z ** 2).sum(-1))
    a, b = _pairs(ranks.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (z[:, a] * z[:, b]).sum(-1) / (norm[:, a] * norm[:, b])  # NaN for a constant side
    return _nanmean(rho, 1)


def triplet_agreement_draws(kept: np.ndarray) -> np.ndarray:
    """`triplet_agreement` of each draw of (draws, seeds, modules, slots) kept masks: (draws,)."""
    a, b = _pairs(kept.shape[1])
    inter = (kept[:, a] & kept[:, b]).sum(-1)
    union = (kept[:, a] | kept[:, b]).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(union > 0, inter / union, np.nan)  # (draws, pairs, modules)
    return _nanmean(_nanmean(jac, 1), 1)


def _p_upper(observed: float | None, null: np.ndarray) -> float | None:
    v = null[~np.isnan(null)]
    if observed is None or not v.size:
        return None
    return float((1 + (v >= observed - 1e-12).sum()) / (1 + v.size))


def _summary(v: np.ndarray, q: float | None = None) -> float | None:
    v = v[~np.isnan(v)]
    return None if not v.size else float(np.quantile(v, q) if q is not None else v.mean())


def chance_levels(ranks_by_seed: Sequence[Mapping[str, int]], sizes: Mapping[str, int], draws: int = 200,
                  seed: int = 0, observed: Mapping[str, float | None] | None = None) -> dict[str, float | None]:
    """The chance levels of `rank_agreement` and `triplet_agreement` for these seeds' ranks (see the module
    docstring): ``spearman``, ``spearman_q95``, ``jaccard``, ``jaccard_q95`` (permuted histogram),
    ``jaccard_given_ranks``; with `observed` (``{"spearman": ..., "jaccard": ...}``) also ``spearman_p`` and
    ``jaccard_p``."""
    rng = np.random.default_rng(seed)
    _, ranks, kept = random_allocations(ranks_by_seed, sizes, draws, rng)
    rho, jac = rank_agreement_draws(ranks), triplet_agreement_draws(kept)
    given = triplet_agreement_draws(random_allocations(ranks_by_seed, sizes, draws, rng, permute=False)[2])
    out = {"spearman": _summary(rho), "spearman_q95": _summary(rho, 0.95), "jaccard": _summary(jac),
           "jaccard_q95": _summary(jac, 0.95), "jaccard_given_ranks": _summary(given)}
    if observed is not None:
        out["spearman_p"] = _p_upper(observed.get("spearman"), rho)
        out["jaccard_p"] = _p_upper(observed.get("jaccard"), jac)
    return out


def movement(events: Mapping[str, Any]) -> dict[str, Any]:
    """One run's allocation over the schedule, from results.json's ``allocation_events``: ``steps``,
    ``rho_to_final`` (ρ of each event with the last; None where an event's ranks are all equal), ``l1`` (from
    the previous event; the first event has none), ``total_l1``, ``forced_l1`` (what the budget forces),
    ``reallocation`` (the rest) and ``settle_step`` (see the module docstring)."""
    steps = list(events["steps"])
    ranks = [np.asarray(decode(r)) for r in events["ranks"]]
    if not ranks:
        return {"steps": [], "rho_to_final": [], "l1": [], "total_l1": 0, "forced_l1": 0, "reallocation": 0,
                "settle_step": None}
    rho = [spearman(r, ranks[-1]) for r in ranks]
    l1 = [None] + [int(np.abs(b - a).sum()) for a, b in zip(ranks, ranks[1:])]
    forced = sum(abs(int(b.sum()) - int(a.sum())) for a, b in zip(ranks, ranks[1:]))
    total = sum(x for x in l1 if x is not None)
    settle = None
    for i in range(len(rho)):
        if all(r is not None and r >= SETTLED for r in rho[i:]):
            settle = steps[i]
            break
    return {"steps": steps, "rho_to_final": rho, "l1": l1, "total_l1": total, "forced_l1": forced,
            "reallocation": total - forced, "settle_step": settle}


def group_stability(runs: Sequence[Mapping[str, Any]], draws: int = 200, seed: int = 0) -> dict[str, Any]:
    """The measures for the runs of one group. Each run is a mapping with ``seed``, ``final_ranks`` and, for
    runs that recorded them, ``kept_triplets`` (module -> "i j ...") and ``allocation_events``.

    Returns ``n`` (runs with final ranks), ``spearman`` and ``jaccard`` (None with fewer than 2 runs; jaccard
    only over runs with kept triplets), ``chance`` (`chance_levels`; needs the module sizes from the events),
    ``module_jaccard``, and per run (``seeds``, ``movements``) the `movement` of those with events.
    """
    runs = sorted((r for r in runs if r.get("final_ranks")), key=lambda r: r["seed"])
    ranks = [{n: int(v) for n, v in r["final_ranks"].items()} for r in runs]
    with_kept = [r for r in runs if r.get("kept_triplets")]
    kept = [{n: decode(v) for n, v in r["kept_triplets"].items()} for r in with_kept]
    out: dict[str, Any] = {"n": len(runs), "n_kept": len(kept), "spearman": rank_agreement(ranks),
                           "jaccard": triplet_agreement(kept) if len(kept) > 1 else None,
                           "module_jaccard": module_jaccard(kept) if len(kept) > 1 else {}, "chance": None}
    with_events = [r for r in runs if r.get("allocation_events")]
    if len(runs) > 1 and with_events:
        ev = with_events[0]["allocation_events"]
        sizes = dict(zip(ev["modules"], decode(ev["sizes"])))
        known = [{n: v for n, v in r.items() if n in sizes} for r in ranks]
        out["chance"] = chance_levels(known, sizes, draws, seed, {"spearman": out["spearman"], "jaccard": out["jaccard"]})
    out["seeds"] = [r["seed"] for r in with_events]
    out["movements"] = [movement(r["allocation_events"]) for r in with_events]
    return out
