"""Aggregate ``results.json`` files into ``runs.csv``, ``summary.md`` and plots.

    python -m adarank.report DIR... [--out OUT_DIR] [--metric value|best_value] [--reference adalora]

Models. Runs are grouped by (task, model, method, budget), the model being results.json's ``model``:
runs of different models are never averaged, paired or chosen between. When the runs of one group
differ in a config field that changes the computation (any but the seed, the learning rate, output
paths, logging, progress, device, W&B and execution settings: ``adarank.studies.runs.NOT_COMPUTATION``),
a warning per group names the fields and their values, and summary.md lists them. With more than
one model, ``runs.csv`` and every table gain a ``model`` column (after ``task``), the per-group plots'
names and the metric-vs-budget lines name the model; with one model the outputs have no such column.

Learning rate. Each run's learning rate is the one its optimizer ran with: results.json's ``lr``,
or, in files written before that field, ``config.method.lr`` (``config.train.lr`` when that is
null; see ``adarank.studies.runs.applied_lr``). When a (task, model, method, budget) ran at several
learning rates, the one with the best mean carved-validation metric over its seeds
(``metrics.best["val/<metric>"]``, the ``val_value`` column) is chosen: higher is better, lower
for ppl/perplexity/nll/loss, and ties go to the smaller learning rate. The official dev values
never take part in the choice. Every table and plot below uses only the chosen learning rate's
runs; ``runs.csv`` keeps all runs and marks them in its ``selected`` column. A group with several
learning rates and no validation metric at all is left out, with a warning.

``summary.md`` holds (a) the learning-rate choice, when any group had one to make: every
candidate with its mean validation metric and its number of seeds; (b) mean ± sample std per
(task, method, budget); (c) a GLUE-style average per (method, budget) over the tasks every
(method, budget) has; (d) paired differences over shared seeds, reference method minus every
other method at the same (task, budget), with a two-sided paired t-test; (e) for adaptive
methods (runs with ``final_ranks``), where the rank went: the mean final rank per matrix type
(q, k, v, attn-out, ffn-in, ffn-out; Llama's q_proj ... down_proj keep their names) and per
layer, with the bottom and top halves of the stack; (f) for the same groups, the allocation's
stability over seeds against seeded chance levels and its movement over the schedule
(``adarank.studies.stability``; the kept triplets and masking events come from runs that recorded
them). Runs without a budget (full fine-tuning) are their own row and are paired with every budget.

Plots, in OUT_DIR: ``metric_vs_budget_<task>.png``; per (task, method, budget) of an adaptive
method, ``rank_heatmap_<task>_<method>_r<budget>.png`` (mean final rank over seeds, layer x
matrix type), ``budget_curve_<task>_<method>_r<budget>.png`` (the budget schedule) and
``movement_<task>_<method>_r<budget>.png`` (ρ with the final ranks and L1 change per masking event);
``stability.png`` (every adaptive group's agreement over seeds against chance); with runs of
several models, ``<task>_<model>_<method>`` in those names.
Needs numpy and scipy, not pandas.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from adarank.atomic import atomic_write_text
from adarank.runner.methods import METHODS
from adarank.runner.plots import NO_LAYER, layer_key, parse_module_name, rank_heatmap
from adarank.studies.errors import StudyError
from adarank.studies.plots import agreement_vs_chance, allocation_movement, budget_curves, metric_vs_budget
from adarank.studies.stability import group_stability
from adarank.studies.runs import (
    applied_lr,
    computation_config,
    config_differences,
    find_diverged,
    find_results,
    get_nested,
    read_record,
    record_model,
)

RESULT_COLUMNS = ("task", "method", "budget", "seed", "metric", "value", "best_value",
                  "trainable_params", "steps", "seconds")
COLUMNS = (*RESULT_COLUMNS, "lr", "val_value", "selected")
#: runs.csv's columns when the runs are of more than one model
MODEL_COLUMNS = (COLUMNS[0], "model", *COLUMNS[1:])
REQUIRED = ("task", "method", "seed", "value")
#: methods in the order the runner lists them (its registry); unknown ones sort last, by name
METHOD_ORDER = tuple(METHODS)
METRIC_DOC = {
    "value": "final official-dev value",
    "best_value": "official-dev value at the step with the best carved-validation metric",
}
LOWER_IS_BETTER = frozenset({"ppl", "perplexity", "nll", "loss"})
# Matrix types in the order a transformer block runs them: BERT/RoBERTa/DeBERTa names are mapped
# to short labels, Llama's keep their own names.
TYPE_ORDER = ("q", "k", "v", "attn-out", "ffn-in", "ffn-out",
              "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SHORT_TYPE = {"query": "q", "query_proj": "q", "key": "k", "key_proj": "k", "value": "v", "value_proj": "v"}
PEFT_PREFIX = "base_model.model."

Key = tuple[str, str | None, str, int | None]  # (task, model, method, budget): one group of runs
Groups = dict[tuple[str, str, int | None], dict[int, float]]  # (task, method, budget) -> seed -> value, one model
ModelGroups = dict[Key, dict[int, float]]  # (task, model, method, budget) -> seed -> value


# ---------------------------------------------------------------- loading


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


def load_row(path: Path) -> dict[str, Any]:
    """The report's columns from one ``results.json``, plus ``model``, ``path``, ``final_ranks``, ``budget_curve``
    and ``config`` (its fields that change the computation, see ``computation_config``)."""
    data = read_record(path)
    missing = [k for k in REQUIRED if data.get(k) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    row = {c: data.get(c) for c in RESULT_COLUMNS}
    row["budget"] = None if row["budget"] is None else int(row["budget"])
    row["seed"] = int(row["seed"])
    row["lr"] = applied_lr(data)
    row["val_value"] = _float(get_nested(data, "metrics", "best", f"val/{row['metric']}"))
    row["selected"] = True  # until select_lr has seen the other learning rates
    row["final_ranks"] = {n: float(r) for n, r in (data.get("final_ranks") or {}).items()}
    row["budget_curve"] = [[int(s), float(b)] for s, b in data.get("budget_curve") or []]
    # the allocation's course (adarank.runner.events), for the stability section; absent in older files
    row["kept_triplets"] = data.get("kept_triplets") or {}
    row["allocation_events"] = data.get("allocation_events")
    row["model"] = record_model(data)
    row["config"] = computation_config(data)
    row["path"] = str(path)
    return row


def _method_key(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


def _budget_key(budget: int | None) -> int:
    return -1 if budget is None else budget


def _lr_key(lr: float | None) -> tuple[bool, float]:
    return (lr is None, 0.0 if lr is None else lr)  # an unknown lr sorts last


def _model_key(model: str | None) -> tuple[bool, str]:
    return (model is None, model or "")  # an unknown model sorts last


def _group_key(key: Key) -> tuple:
    return (key[0], _model_key(key[1]), _method_key(key[2]), _budget_key(key[3]))


def _row_key(row: dict[str, Any]) -> tuple:
    return (*_group_key(_key(row)), _lr_key(row["lr"]), row["seed"])


def _key(row: dict[str, Any]) -> Key:
    return (row["task"], row["model"], row["method"], row["budget"])


def _lr(lr: float | None) -> str:
    return "-" if lr is None else format(lr, "g")


def _model(model: str | None) -> str:
    return "-" if model is None else model


def several_models(rows: Iterable[dict[str, Any]]) -> bool:
    """Whether ``rows`` are runs of more than one model (then the outputs name the model)."""
    return len({r["model"] for r in rows}) > 1


def _group(key: Key, multi: bool) -> str:
    """``task=... [model=...] method=... budget=...`` of a group, for warnings."""
    task, model, method, budget = key
    return f"task={task}" + (f" model={_model(model)}" if multi else "") + f" method={method} budget={_budget(budget)}"


def load_rows(paths: Iterable[Path], warn: Callable[[str], None]) -> list[dict[str, Any]]:
    """Rows sorted by task, model, method, budget, lr, seed; unreadable files and duplicates are warned about
    (a duplicate names its model when the runs are of several)."""
    rows: dict[tuple, dict[str, Any]] = {}
    notes: list[str | tuple[tuple, str, str]] = []  # warnings in file order; duplicates formatted at the end
    for path in paths:
        try:
            row = load_row(path)
        except (OSError, ValueError, TypeError, AttributeError) as e:
            notes.append(f"warning: skipping {path}: {e}")
            continue
        key = (*_key(row), row["lr"], row["seed"])
        if key in rows:
            notes.append((key, str(path), rows[key]["path"]))
        rows[key] = row  # paths come sorted, so the last one by path order wins
    multi = several_models(rows.values())
    for note in notes:
        if isinstance(note, tuple):
            (task, model, method, budget, lr, seed), kept, dropped = note
            note = (f"warning: duplicate run task={task}" + (f" model={_model(model)}" if multi else "")
                    + f" method={method} budget={budget} lr={_lr(lr)} seed={seed}: keeping {kept}, dropping {dropped}")
        warn(note)
    return sorted(rows.values(), key=_row_key)


def mixed_configs(rows: Iterable[dict[str, Any]]) -> dict[Key, dict[str, list[str]]]:
    """Per group (task, model, method, budget) whose runs differ in a config field that changes the computation
    (see ``adarank.studies.runs.NOT_COMPUTATION``): field -> its distinct values. All runs count, at any lr."""
    by_group: dict[Key, list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        by_group[_key(r)].append(r.get("config") or {})
    return {key: diff for key in sorted(by_group, key=_group_key) if (diff := config_differences(by_group[key]))}


def mixed_config_lines(mixed: Mapping[Key, Mapping[str, Sequence[str]]], multi: bool) -> list[str]:
    """One line per group of ``mixed_configs``, naming the fields and their values."""
    return [f"{_group(key, multi)}: its runs differ in "
            + ", ".join(f"{name} ({' vs '.join(values)})" for name, values in diff.items())
            + "; they are summarised together" for key, diff in mixed.items()]


def _cell(x: Any) -> Any:
    if x is None:
        return ""
    return str(x).lower() if isinstance(x, bool) else x


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Write ``rows`` as ``runs.csv`` (None as an empty cell, booleans as true/false): ``columns``, by default
    ``COLUMNS``, or ``MODEL_COLUMNS`` when the rows are of several models."""
    columns = columns or (MODEL_COLUMNS if several_models(rows) else COLUMNS)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow([_cell(r[c]) for c in columns])
    atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------- learning-rate selection


def lower_is_better(metric: str | None) -> bool:
    """Whether a smaller value of ``metric`` is better (perplexities and losses)."""
    return str(metric).lower() in LOWER_IS_BETTER


def choose_lr(mean_val: Mapping[float | None, float | None], lower: bool = False) -> float | None:
    """The learning rate with the best mean validation metric; ties go to the smaller one.

    A single candidate is chosen as it is. Candidates without a (finite or infinite) mean are
    skipped; raises ValueError when several candidates have none.
    """
    if len(mean_val) == 1:
        return next(iter(mean_val))
    scored = sorted(((lr, v) for lr, v in mean_val.items() if v is not None and not math.isnan(v)),
                    key=lambda kv: _lr_key(kv[0]))
    if not scored:
        raise ValueError("no learning rate has a validation metric")
    sign = -1.0 if lower else 1.0
    best_lr, best = scored[0]
    for lr, v in scored[1:]:
        # Strictly better by more than rounding, so equal means keep the smaller lr.
        if sign * (v - best) > 1e-12 * max(1.0, abs(best)):
            best_lr, best = lr, v
    return best_lr


@dataclass
class LrChoice:
    """The learning rates one (task, model, method, budget) ran at, and the one chosen."""

    runs: dict[float | None, list[dict[str, Any]]]
    """lr -> its runs, in lr order."""
    chosen: float | None
    """The chosen lr (None also when the runs record no lr); meaningless unless ``found``."""
    found: bool
    """False when several lrs ran and none has a validation metric: nothing is chosen."""

    def vals(self, lr: float | None) -> list[float]:
        """The validation metrics of ``lr``'s runs, skipping runs without one."""
        return [r["val_value"] for r in self.runs[lr] if r["val_value"] is not None]

    def mean_val(self, lr: float | None) -> float | None:
        v = self.vals(lr)
        return float(np.mean(v)) if v else None


def select_lr(rows: Iterable[dict[str, Any]]) -> dict[Key, LrChoice]:
    """Per (task, model, method, budget), choose the lr by the mean validation metric over seeds (see ``choose_lr``)."""
    by_group: dict[Key, dict[float | None, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by_group[_key(r)][r["lr"]].append(r)
    choices = {}
    for key, by_lr in by_group.items():
        runs = {lr: by_lr[lr] for lr in sorted(by_lr, key=_lr_key)}
        choice = LrChoice(runs, None, True)
        lower = lower_is_better(next(iter(runs.values()))[0]["metric"])
        try:
            choice.chosen = choose_lr({lr: choice.mean_val(lr) for lr in runs}, lower)
        except ValueError:
            choice.found = False
        choices[key] = choice
    return choices


def mark_selected(rows: Iterable[dict[str, Any]], choices: Mapping[Key, LrChoice]) -> None:
    """Set each row's ``selected``: whether it ran at its group's chosen learning rate."""
    for r in rows:
        c = choices[_key(r)]
        r["selected"] = c.found and r["lr"] == c.chosen


# ---------------------------------------------------------------- statistics


def group_values(rows: Iterable[dict[str, Any]], column: str) -> ModelGroups:
    """(task, model, method, budget) -> {seed: value of ``column``}, skipping runs that lack it."""
    groups: ModelGroups = defaultdict(dict)
    for r in rows:
        if r[column] is not None:
            groups[_key(r)][r["seed"]] = float(r[column])
    return dict(groups)


def of_model(groups: ModelGroups, model: str | None) -> Groups:
    """The groups of one model, keyed (task, method, budget)."""
    return {(t, me, b): v for (t, mo, me, b), v in groups.items() if mo == model}


def mean_std(values: Iterable[float]) -> tuple[float, float | None]:
    """Mean and sample std (None for a single value)."""
    v = np.asarray(list(values), dtype=float)
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None)


def task_average(groups: Groups | ModelGroups) -> tuple[list[str], dict[tuple, float]]:
    """GLUE-style score: per (method, budget), or (model, method, budget) for groups keyed with the model,
    the mean over tasks of per-task means.

    Only tasks that every one of them has are used, so the averages are comparable.
    Returns those tasks and the averages.
    """
    tasks_of: dict[tuple, set[str]] = defaultdict(set)
    for task, *config in groups:
        tasks_of[tuple(config)].add(task)
    common = sorted(set.intersection(*tasks_of.values())) if tasks_of else []
    averages = {
        cfg: float(np.mean([mean_std(groups[(t, *cfg)].values())[0] for t in common]))
        for cfg in tasks_of
    } if common else {}
    return common, averages


def paired_test(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided paired t-test p-value; None when undefined (n < 2 or constant differences)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if d.size < 2 or np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):
        return None
    from scipy.stats import ttest_rel  # lazy: scipy.stats takes a while to import

    return float(ttest_rel(a, b).pvalue)


def paired_differences(groups: Groups, reference: str = "adalora") -> list[dict[str, Any]]:
    """Per (task, budget): reference minus every other method over shared seeds.

    Budget-less runs (full fine-tuning) join every budget's comparisons, after the others.
    If the reference is missing at a (task, budget), every pair is compared instead: the
    later method in ``METHOD_ORDER`` minus the earlier, and each method minus full.
    """
    out = []
    for task in sorted({t for t, _, _ in groups}):
        unbudgeted = sorted((m for t, m, b in groups if t == task and b is None), key=_method_key)
        for budget in sorted({b for t, _, b in groups if t == task and b is not None}):
            here = sorted((m for t, m, b in groups if t == task and b == budget), key=_method_key)
            if reference in here:
                pairs = [(reference, m, budget) for m in here if m != reference]
                pairs += [(reference, m, None) for m in unbudgeted]
            else:
                pairs = [(later, earlier, budget) for earlier, later in combinations(here, 2)]
                pairs += [(m, u, None) for m in here for u in unbudgeted]
            for ma, mb, budget_b in pairs:
                va, vb = groups[(task, ma, budget)], groups[(task, mb, budget_b)]
                seeds = sorted(set(va) & set(vb))
                if not seeds:
                    continue
                a, b = [va[s] for s in seeds], [vb[s] for s in seeds]
                out.append({"task": task, "budget": budget, "a": ma, "b": mb, "n": len(seeds),
                            "mean_diff": float(np.mean(np.subtract(a, b))), "p": paired_test(a, b)})
    return out


# ---------------------------------------------------------------- rank allocation


def matrix_type(name: str) -> str:
    """The kind of matrix a module name adapts: q, k, v, attn-out, ffn-in, ffn-out for BERT-style
    encoders (RoBERTa, DeBERTa's query_proj too), Llama's own names (q_proj ... down_proj), else
    the name's part after the layer index (the whole name when it has none, e.g. a pooler).

    >>> matrix_type("bert.encoder.layer.3.attention.output.dense")
    'attn-out'
    """
    _, t = parse_module_name(name)
    last = t.rsplit(".", 1)[-1]
    if last in _SHORT_TYPE:
        return _SHORT_TYPE[last]
    if t.endswith("attention.output.dense"):  # before "output.dense", which it also ends with
        return "attn-out"
    if t.endswith("intermediate.dense"):
        return "ffn-in"
    if t == "output.dense" or t.endswith(".output.dense"):
        return "ffn-out"
    return last if last in TYPE_ORDER else t


def mean_ranks(rows: Iterable[dict[str, Any]]) -> dict[Key, tuple[int, dict[str, float]]]:
    """Per (task, model, method, budget) of runs with ``final_ranks``: (number of runs, module -> mean final rank).

    A module's mean is over the runs that report it. PEFT's ``base_model.model.`` prefix is dropped,
    so its runs and ours share module names.
    """
    by_group: dict[Key, list[dict[str, float]]] = defaultdict(list)
    for r in rows:
        if r["final_ranks"]:
            by_group[_key(r)].append({n.removeprefix(PEFT_PREFIX): v for n, v in r["final_ranks"].items()})
    out = {}
    for key, runs in by_group.items():
        names = list(dict.fromkeys(n for ranks in runs for n in ranks))  # the model's order
        out[key] = (len(runs), {n: float(np.mean([ranks[n] for ranks in runs if n in ranks])) for n in names})
    return out


def rank_breakdown(ranks: Mapping[str, float]) -> dict[str, Any]:
    """Mean rank per module: over all modules (``all``), per matrix type (``type``), per layer (``layer``),
    and over the bottom and top halves of the layers (``bottom``, ``top``; the middle layer of an odd
    count is in neither; None with fewer than two layers)."""
    by_type: dict[str, list[float]] = defaultdict(list)
    by_layer: dict[str, list[float]] = defaultdict(list)
    for name, r in ranks.items():
        by_type[matrix_type(name)].append(r)
        by_layer[parse_module_name(name)[0]].append(r)
    layers = sorted((la for la in by_layer if la != NO_LAYER), key=int)
    half = len(layers) // 2

    def mean(layer_names: Sequence[str]) -> float | None:
        v = [r for la in layer_names for r in by_layer[la]]
        return float(np.mean(v)) if v else None

    return {"all": float(np.mean(list(ranks.values()))),
            "type": {t: float(np.mean(v)) for t, v in by_type.items()},
            "layer": {la: float(np.mean(v)) for la, v in by_layer.items()},
            "bottom": mean(layers[:half]) if half else None,
            "top": mean(layers[-half:]) if half else None}


def _type_key(t: str) -> tuple[int, str]:
    return (TYPE_ORDER.index(t), "") if t in TYPE_ORDER else (len(TYPE_ORDER), t)


# ---------------------------------------------------------------- markdown


def _num(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _budget(b: int | None) -> str:
    return "-" if b is None else str(b)


def _table(header: Sequence[str], body: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return lines


def _m(multi: bool, model: str | None = "model") -> list[str]:
    """The model cell of a table row (the header's with no model given), only when the runs are of several."""
    return [_model(model)] if multi else []


def _lr_section(choices: Mapping[Key, LrChoice], column: str, metric: Mapping[str, str],
                multi: bool = False) -> list[str]:
    lines = ["", "## Learning rate chosen on the validation split", "",
             (f"Per (task, {'model, ' if multi else ''}method, budget), the learning rate with the best mean "
              "carved-validation metric at the best step (`val_value`) over its seeds; lower is better for "
              "perplexities and losses, "
              f"ties go to the smaller lr. The mean dev `{column}` is shown for reference only; it plays no "
              "part in the choice. n: runs with a validation metric / runs."), ""]
    body = []
    for key in sorted(choices, key=_group_key):
        c = choices[key]
        task, model, method, budget = key
        for lr, runs in c.runs.items():
            dev = [r[column] for r in runs if r[column] is not None]
            mark = "✓" if c.found and lr == c.chosen else ("no val metric: left out" if not c.found else "")
            body.append([task, *_m(multi, model), metric[task], method, _budget(budget), _lr(lr),
                         f"{len(c.vals(lr))}/{len(runs)}", _num(c.mean_val(lr)),
                         _num(float(np.mean(dev)) if dev else None), mark])
    return lines + _table(["task", *_m(multi), "metric", "method", "budget", "lr", "n", "mean val",
                           f"mean dev {column}", "chosen"], body)


def _rank_section(rows: Sequence[dict[str, Any]], multi: bool = False) -> list[str]:
    ranks = mean_ranks(rows)
    if not ranks:
        return []
    lr_of = {_key(r): r["lr"] for r in rows}
    keys = sorted(ranks, key=_group_key)
    n_of = {key: ranks[key][0] for key in keys}
    parts = {key: rank_breakdown(ranks[key][1]) for key in keys}
    types = sorted({t for p in parts.values() for t in p["type"]}, key=_type_key)
    layers = sorted({la for p in parts.values() for la in p["layer"]}, key=layer_key)

    def two(x: float | None) -> str:
        return _num(x, ".2f")

    def group(key: Key) -> list[str]:
        return [key[0], *_m(multi, key[1]), key[2], _budget(key[3])]

    lines = ["", "## Where the rank went", "",
             ("Adaptive methods: the final rank of each module, averaged over seeds, then over the modules of "
              "a matrix type or a layer (all: every module, the average rank the budget fixes). The AdaLoRA "
              "paper finds that FFN matrices (ffn-in, ffn-out) and top layers get more rank."), "",
             "### By matrix type", ""]
    body = [[*group(key), _lr(lr_of[key]), n_of[key], two(parts[key]["all"]),
             *(two(parts[key]["type"].get(t)) for t in types)] for key in keys]
    header = ["task", *_m(multi), "method", "budget"]
    lines += _table([*header, "lr", "n seeds", "all", *types], body)
    lines += ["", "### By layer", "",
              ("Bottom and top: the lower and upper halves of the layers "
               "(the middle layer of an odd count is in neither)."), ""]
    body = [[*group(key), n_of[key], *(two(parts[key]["layer"].get(la)) for la in layers),
             two(parts[key]["bottom"]), two(parts[key]["top"])] for key in keys]
    names = ["no layer" if la == NO_LAYER else f"layer {la}" for la in layers]
    lines += _table([*header, "n seeds", *names, "bottom", "top"], body)
    return lines


def _diverged_section(diverged: Sequence[tuple[Path, dict[str, Any]]]) -> list[str]:
    lines = ["", "## Diverged runs", "",
             (f"{len(diverged)} run(s) stopped on a non-finite loss or weights. They are in no table or plot, and a "
              "learning rate is scored on its finished runs only."), ""]
    rows = [[str(path.parent), " ".join(rec.get("overrides") or []) or "-", str(rec.get("error", "-")).replace("|", "/")]
            for path, rec in diverged]
    return lines + _table(["run", "overrides", "error"], rows)


def _mixed_section(mixed: Mapping[Key, Mapping[str, Sequence[str]]], multi: bool) -> list[str]:
    lines = ["", "## Groups whose runs differ in their config", "",
             ("These groups mix runs that differ in config fields that change the computation (besides the seed "
              "and the learning rate); their rows in the tables below mix those runs:"), ""]
    return lines + [f"- {line}" for line in mixed_config_lines(mixed, multi)]


def _means_section(groups: ModelGroups, metric: Mapping[str, str], lr_of: Mapping[Key, float | None],
                   multi: bool) -> list[str]:
    lines = ["", f"## Mean ± std per task, {'model, ' if multi else ''}method and budget", ""]
    body = []
    for key, by_seed in sorted(groups.items(), key=lambda kv: _group_key(kv[0])):
        task, model, method, budget = key
        mean, std = mean_std(by_seed.values())
        body.append([task, *_m(multi, model), metric[task], method, _budget(budget), len(by_seed), _lr(lr_of[key]),
                     f"{_num(mean)} ± {_num(std)}"])
    return lines + _table(["task", *_m(multi), "metric", "method", "budget", "n", "lr", "mean ± std"], body)


def _average_section(groups: ModelGroups, multi: bool) -> list[str]:
    lines = ["", "## Average over tasks", ""]
    every = f"every ({'model, ' if multi else ''}method, budget)"
    common, averages = task_average(groups)  # per (model, method, budget)
    if not averages:
        return lines + [f"No task is shared by {every}; no average."]
    left_out = sorted({t for t, *_ in groups} - set(common))
    lines.append(f"Mean of per-task means over {len(common)} task(s) that {every} has: "
                 f"{', '.join(common)}." + (f" Left out: {', '.join(left_out)}." if left_out else ""))
    lines.append("")
    body = [[*_m(multi, mo), me, _budget(b), _num(v)] for (mo, me, b), v in
            sorted(averages.items(), key=lambda kv: (_model_key(kv[0][0]), _method_key(kv[0][1]), _budget_key(kv[0][2])))]
    return lines + _table([*_m(multi), "method", "budget", "average"], body)


def _paired_section(groups: ModelGroups, reference: str, multi: bool) -> list[str]:
    lines = ["", f"## Paired differences over seeds (reference: {reference})", "",
             ("Mean of A - B over the seeds both have; p from a two-sided paired t-test "
              "(n/a when n < 2 or the differences are constant). "
              "Runs without a budget are paired with every budget."
              + (" Runs are paired within one model only." if multi else "")), ""]
    body = []
    for model in sorted({k[1] for k in groups}, key=_model_key):
        body += [[p["task"], *_m(multi, model), _budget(p["budget"]), f"{p['a']} - {p['b']}", p["n"],
                  _num(p["mean_diff"], "+.4f"), _num(p["p"], ".3g")]
                 for p in paired_differences(of_model(groups, model), reference)]
    if not body:
        return lines + [f"No two methods share a task, {'model, ' if multi else ''}budget and seed."]
    body.sort(key=lambda row: row[0])  # by task, then model (stable)
    return lines + _table(["task", *_m(multi), "budget", "A - B", "n pairs", "mean diff", "p"], body)


def stability_by_group(rows: Sequence[dict[str, Any]], draws: int = 200) -> dict[Key, dict[str, Any]]:
    """Per (task, model, method, budget) of adaptive runs (``final_ranks``): `group_stability` over its seeds
    (the rows at one learning rate: pass the selected ones). PEFT's module prefix is dropped, as in `mean_ranks`."""
    by_group: dict[Key, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["final_ranks"]:
            ranks = {n.removeprefix(PEFT_PREFIX): v for n, v in r["final_ranks"].items()}
            by_group[_key(r)].append({**r, "final_ranks": ranks})
    return {key: group_stability(runs, draws) for key, runs in sorted(by_group.items(), key=lambda kv: _group_key(kv[0]))}


def _stability_section(stability: Mapping[Key, dict[str, Any]] | None, multi: bool) -> list[str]:
    if not stability:
        return []
    two, p3 = (lambda x: _num(x, ".2f")), (lambda x: _num(x, ".3g"))
    lines = ["", "## Allocation stability over seeds", "",
             ("Adaptive methods, per group (its seeds at the chosen learning rate). ρ: Spearman between two seeds' "
              "final per-module ranks, mean over pairs of seeds; Jaccard: overlap of two seeds' kept triplet "
              "indices per module, mean over pairs, then over modules. Chance: the same statistics for random "
              "allocations that keep each seed's rank histogram (its per-module ranks permuted over the modules, "
              "kept triplets drawn uniformly within each module), mean and 95th percentile over draws, and the "
              "one-sided p of the observed value; Jaccard | ranks: the chance overlap when each seed keeps its "
              "own per-module ranks (`adarank/studies/stability.py`). n/a: fewer than two seeds, or results.json "
              "without kept triplets or masking events (PEFT's AdaLoRA records none)."), ""]
    body = []
    for (task, model, method, budget), st in stability.items():
        c = st["chance"] or {}
        body.append([task, *_m(multi, model), method, _budget(budget), st["n"], two(st["spearman"]),
                     f"{two(c.get('spearman'))} / {two(c.get('spearman_q95'))}", p3(c.get("spearman_p")),
                     two(st["jaccard"]), f"{two(c.get('jaccard'))} / {two(c.get('jaccard_q95'))}",
                     p3(c.get("jaccard_p")), two(c.get("jaccard_given_ranks"))])
    lines += _table(["task", *_m(multi), "method", "budget", "n seeds", "ρ", "chance ρ (mean / q95)", "p",
                     "Jaccard", "chance (mean / q95)", "p", "Jaccard given ranks"], body)
    lines += ["", "### Movement over the schedule", "",
              ("Per run, over its masking events (mean over seeds): the total L1 change of the per-module ranks "
               "between consecutive events, the part of it the shrinking budget forces, the rest (rank moved "
               "between modules), ρ with the final allocation of the earliest event whose ranks are not all equal, "
               "and the first step from which ρ with the final stays >= 0.9."), ""]
    body = [[task, *_m(multi, model), method, _budget(budget), *_movement_cells(st["movements"])]
            for (task, model, method, budget), st in stability.items() if st["movements"]]
    if body:
        lines += _table(["task", *_m(multi), "method", "budget", "n runs", "events", "total L1", "forced by budget",
                         "reallocation", "earliest ρ", "settled from step"], body)
    else:
        lines.append("No run recorded its masking events.")
    return lines


def _movement_cells(movements: Sequence[dict[str, Any]]) -> list[Any]:
    """The movement table's cells of one group: its runs' means (over the runs where a value is defined)."""
    def mean(values: Iterable[float | None]) -> float | None:
        v = [x for x in values if x is not None]
        return float(np.mean(v)) if v else None

    earliest = mean(next((r for r in m["rho_to_final"] if r is not None), None) for m in movements)
    return [len(movements), len(movements[0]["steps"]),
            *(_num(mean(m[k] for m in movements), ".1f") for k in ("total_l1", "forced_l1", "reallocation")),
            _num(earliest, ".2f"), _num(mean(m["settle_step"] for m in movements), ".0f")]


def write_stability_plots(stability: Mapping[Key, dict[str, Any]], out: Path, multi: bool) -> list[tuple[str, Path]]:
    """``stability.png`` (every group's agreement against chance) and, per group with masking events,
    ``movement_<group>.png``; returns (caption, path) of each plot written."""
    written = []
    entries = [{"label": _title(key, multi), **st} for key, st in stability.items()]
    path = agreement_vs_chance(entries, out / "stability.png", title="final allocations: seeds against chance")
    if path is not None:
        written.append(("stability over seeds", path))
    for key, st in stability.items():
        moves = {f"seed {s}": m for s, m in zip(st["seeds"], st["movements"])}
        path = allocation_movement(moves, out / f"movement_{_group_name(key, multi)}.png", title=_title(key, multi))
        if path is not None:
            written.append((_caption("movement", key, multi), path))
    return written


def render_summary(rows: Sequence[dict[str, Any]], column: str, reference: str,
                   plots: Mapping[str, Path | None], choices: Mapping[Key, LrChoice] | None = None,
                   group_plots: Sequence[tuple[str, Path]] = (),
                   diverged: Sequence[tuple[Path, dict[str, Any]]] = (),
                   stability: Mapping[Key, dict[str, Any]] | None = None) -> str:
    """The text of ``summary.md``.

    ``rows`` are all runs; only those with ``selected`` are summarised. ``choices`` (from
    ``select_lr``) gives the learning-rate table when some group had several; ``plots`` maps a task
    to its metric-vs-budget plot, ``group_plots`` are (caption, path) of the per-group plots, ``stability``
    (from ``stability_by_group``) gives the allocation-stability section. With runs
    of several models every table has a model column, and groups whose runs differ in their config
    (``mixed_configs``) are listed.
    """
    all_rows, rows = rows, [r for r in rows if r.get("selected", True)]
    multi = several_models(all_rows)
    groups = group_values(rows, column)
    metric_of: dict[str, set[str]] = defaultdict(set)
    for r in all_rows:
        metric_of[r["task"]].add(str(r["metric"]))
    metric = {t: "/".join(sorted(m)) for t, m in metric_of.items()}
    lr_of = {_key(r): r["lr"] for r in rows}
    several = choices is not None and any(len(c.runs) > 1 for c in choices.values())

    runs = (f"{len(all_rows)} runs, {len(rows)} of them at the learning rate chosen on the validation split; "
            "every table and plot below uses only those." if several else f"{len(rows)} runs.")
    if multi:
        models = sorted({r["model"] for r in all_rows}, key=_model_key)
        runs += (f" They are of {len(models)} models ({', '.join(map(_model, models))}): runs of different "
                 "models are never averaged or paired together.")
    lines = ["# adarank results", "",
             f"{runs} Column `{column}`: {METRIC_DOC[column]}. Std is the sample std over seeds (n/a for one seed)."]
    mixed = mixed_configs(all_rows)
    if mixed:
        lines += _mixed_section(mixed, multi)
    if several:
        lines += _lr_section(choices, column, metric, multi)
    if diverged:
        lines += _diverged_section(diverged)
    lines += _means_section(groups, metric, lr_of, multi)
    lines += _average_section(groups, multi)
    lines += _paired_section(groups, reference, multi)
    lines += _rank_section(rows, multi)
    lines += _stability_section(stability, multi)

    shown = [(t, p) for t, p in plots.items() if p is not None] + list(group_plots)
    if shown:
        lines += ["", "## Plots", ""] + [f"![{t}]({p.name})" for t, p in shown]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _group_name(key: Key, multi: bool = False) -> str:
    task, model, method, budget = key
    model_part = f"{_safe(_model(model))}_" if multi else ""
    return f"{_safe(task)}_{model_part}{_safe(method)}_r{'none' if budget is None else budget}"


def _title(key: Key, multi: bool) -> str:
    task, model, method, budget = key
    return f"{task}{f' {_model(model)}' if multi else ''} {method} r={_budget(budget)}"


def _caption(kind: str, key: Key, multi: bool) -> str:
    task, model, method, budget = key
    return f"{kind} {task}{f' {_model(model)}' if multi else ''} {method} {_budget(budget)}"


def write_group_plots(rows: Sequence[dict[str, Any]], out: Path, multi: bool | None = None) -> list[tuple[str, Path]]:
    """Per (task, model, method, budget) of ``rows``: the mean-rank heatmap and the budget schedule. ``multi``
    (by default: whether ``rows`` are of several models) puts the model in the file names and titles.

    Returns (caption, path) of each plot written.
    """
    multi = several_models(rows) if multi is None else multi
    written = []
    for key, (n, ranks) in sorted(mean_ranks(rows).items(), key=lambda kv: _group_key(kv[0])):
        path = rank_heatmap(ranks, out / f"rank_heatmap_{_group_name(key, multi)}.png",
                            title=f"{_title(key, multi)}: mean final rank over {n} seed(s)")
        if path is not None:
            written.append((_caption("rank", key, multi), path))
    curves: dict[Key, dict[str, list]] = defaultdict(dict)
    for r in rows:
        if r["budget_curve"]:
            curves[_key(r)][f"seed {r['seed']}"] = r["budget_curve"]
    for key in sorted(curves, key=_group_key):
        path = budget_curves(curves[key], out / f"budget_curve_{_group_name(key, multi)}.png", title=_title(key, multi))
        if path is not None:
            written.append((_caption("budget", key, multi), path))
    return written


def write_metric_plots(rows: Sequence[dict[str, Any]], out: Path, column: str, multi: bool) -> dict[str, Path | None]:
    """Per task, ``metric_vs_budget_<task>.png``; with several models each line is a "method (model)"."""
    if multi:
        rows = [{**r, "method": f"{r['method']} ({_model(r['model'])})"} for r in rows]
    return {task: metric_vs_budget(rows, out / f"metric_vs_budget_{_safe(task)}.png", task, column)
            for task in sorted({r["task"] for r in rows})}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad inputs)."""
    parser = argparse.ArgumentParser(prog="python -m adarank.report", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="folders searched for results.json")
    parser.add_argument("--out", help="output folder (default: the first DIR)")
    parser.add_argument("--metric", choices=tuple(METRIC_DOC), default="value",
                        help="which results.json value to summarise")
    parser.add_argument("--reference", default="adalora", help="method the others are paired against")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its message; hand back the code
        return e.code if isinstance(e.code, int) else 2

    def warn(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        rows = load_rows(find_results(args.dirs), warn)
        if not rows:
            raise StudyError(f"{', '.join(args.dirs)}: no readable results.json")
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    multi = several_models(rows)
    for line in mixed_config_lines(mixed_configs(rows), multi):
        warn(f"warning: {line}")
    choices = select_lr(rows)
    mark_selected(rows, choices)
    for key, c in sorted(choices.items(), key=lambda kv: _group_key(kv[0])):
        if not c.found:
            warn(f"warning: {_group(key, multi)} ran at learning rates "
                 f"{', '.join(_lr(lr) for lr in c.runs)} but no run has a validation metric to choose by: left out")
    selected = [r for r in rows if r["selected"]]

    first = Path(args.dirs[0])
    out = Path(args.out) if args.out else (first.parent if first.is_file() else first)
    write_csv(out / "runs.csv", rows)
    plots = write_metric_plots(selected, out, args.metric, multi)
    stability = stability_by_group(selected)
    group_plots = write_group_plots(selected, out, multi) + write_stability_plots(stability, out, multi)
    diverged = find_diverged(args.dirs)
    if diverged:
        warn(f"warning: {len(diverged)} diverged run(s) (diverged.json) are left out of the tables; summary.md lists them")
    atomic_write_text(out / "summary.md",
                      render_summary(rows, args.metric, args.reference, plots, choices, group_plots, diverged,
                                     stability))
    n_plots = sum(p is not None for p in plots.values()) + len(group_plots)
    print(f"wrote {out / 'runs.csv'}, {out / 'summary.md'} and {n_plots} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
