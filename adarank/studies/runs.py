"""Finding and reading the runs the studies work on: ``results.json`` of finished runs, ``diverged.json`` of
runs stopped on a non-finite loss, and the settings a run applied.

The runner records in every results.json the peak learning rate its optimizer ran with (``lr``) and the α
its adapters applied (``alpha``, after ``method.alpha_ratio``; null for full fine-tuning). Result files
written before those fields, and the configs rebuilt for diverged runs, have only the config: for them
`applied_lr` and `applied_alpha` / `applied_alpha_ratio` derive the values from it (`_config_scaling` holds
the α rule), here and nowhere else.

A run's model is results.json's ``model`` (``config.model.name`` in older files; see `record_model`). Runs
that the report puts in one group should differ only in what `NOT_COMPUTATION` lists: `config_differences`
names the other config fields they differ in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adarank.studies.errors import StudyError

FULL = "full"  # full fine-tuning: no adapters, no α

#: ``config`` fields (``section.field``, or a top-level field) that do not change what a run computes: the seed
#: and the learning rate (the report groups over those), where outputs, caches and logs go, progress and
#: W&B settings, the device, and how the same computation is executed (fused layers, torch.compile, CUDA
#: graphs, gradient checkpointing, the evaluation batch size: equal up to rounding). Every other field does.
NOT_COMPUTATION = frozenset({
    "seed", "train.lr", "method.lr", "experiment_name", "resume", "overwrite", "data.cache_dir",
    "train.device", "train.log_every", "train.progress", "train.checkpoint_every", "train.check_masks",
    "train.eval_batch_size", "train.compile", "train.cuda_graph", "train.cuda_graph_shapes", "method.fused",
    "train.gradient_checkpointing",
})
NOT_COMPUTATION_SECTIONS = frozenset({"wandb"})

# ---------------------------------------------------------------- finding runs


def _find(dirs: Sequence[str], names: Sequence[str]) -> dict[str, list[Path]]:
    """Per file name in ``names``: the files of that name under ``dirs`` (a DIR may also be one such file),
    each file once, in path order. A DIR that does not exist, or holds none of them, is a StudyError."""
    found: dict[str, dict[Path, Path]] = {n: {} for n in names}
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise StudyError(f"{d}: no such directory")
        hits = [root] if root.name in names else [h for n in names for h in sorted(root.rglob(n))]
        hits = [h for h in hits if h.is_file()]
        if not hits:
            raise StudyError(f"{d}: no {' or '.join(names)} found")
        for h in hits:
            found[h.name].setdefault(h.resolve(), h)  # overlapping DIRs must not fake duplicates
    return {n: sorted(f.values(), key=str) for n, f in found.items()}


def find_results(dirs: Sequence[str]) -> list[Path]:
    """All ``results.json`` under ``dirs``, each file once, in path order."""
    return _find(dirs, ("results.json",))["results.json"]


def find_runs(dirs: Sequence[str]) -> tuple[list[Path], list[Path]]:
    """(results.json, diverged.json) files under `dirs`, each once. A folder with both holds a run that
    was resumed and finished: its results.json is the record."""
    found = _find(dirs, ("results.json", "diverged.json"))
    finished = {p.resolve().parent for p in found["results.json"]}
    return found["results.json"], [h for h in found["diverged.json"] if h.resolve().parent not in finished]


def find_diverged(dirs: Sequence[str]) -> list[tuple[Path, dict[str, Any]]]:
    """Runs that diverged (a ``diverged.json`` and no ``results.json`` beside it), with their records."""
    out = []
    for path in find_runs(dirs)[1]:
        try:
            out.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            out.append((path, {"error": "unreadable diverged.json"}))
    return out


def read_record(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; OSError or ValueError when it cannot be read, TypeError when it is not an object."""
    record = json.loads(path.read_text())
    if not isinstance(record, dict):
        raise TypeError("not a JSON object")
    return record


# ---------------------------------------------------------------- reading records


def get_nested(record: Any, *keys: str) -> Any:
    """``record[k1][k2]...``, or None where a level is missing or not a dict."""
    for k in keys:
        if not isinstance(record, dict):
            return None
        record = record.get(k)
    return record


def finite(value: Any) -> float | None:
    """`value` as a float; None when it is missing, a bool, not a number, or not finite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def applied_lr(record: Mapping[str, Any]) -> float | None:
    """The peak learning rate the run's optimizer ran with: the record's ``lr``; without that field (older
    results.json, a diverged run's rebuilt config), ``config.method.lr``, which overrides ``config.train.lr``
    when not null. None when unknown."""
    if "lr" in record:
        return finite(record["lr"])
    config = record.get("config")
    lr = get_nested(config, "method", "lr")
    return finite(get_nested(config, "train", "lr") if lr is None else lr)


def _config_scaling(record: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """(α, α/r) from the record's config, for records without the ``alpha`` field.

    ``method.alpha_ratio``, when set, wins: α/r is that ratio and α = alpha_ratio · max(r, 1), as the runner's
    config computes it (α None when r is unknown). Otherwise α is ``method.alpha`` and α/r is α / r. Full
    fine-tuning has neither.
    """
    method = get_nested(record, "config", "method")
    method = method if isinstance(method, dict) else {}
    if (method.get("name") or record.get("method")) == FULL:
        return None, None
    rank, ratio, alpha = finite(method.get("r")), finite(method.get("alpha_ratio")), finite(method.get("alpha"))
    if ratio is not None:
        return (None if rank is None else ratio * max(rank, 1)), ratio
    return alpha, (alpha / rank if alpha is not None and rank else None)


def applied_alpha(record: Mapping[str, Any]) -> float | None:
    """The α the run's adapters applied: the record's ``alpha`` (null for full fine-tuning); without that
    field, from its config (see `_config_scaling`). None when unknown."""
    if "alpha" in record:
        return finite(record["alpha"])
    return _config_scaling(record)[0]


def applied_alpha_ratio(record: Mapping[str, Any]) -> float | None:
    """α / r of the run, r being ``config.method.r``: from the record's ``alpha``; without that field, from
    its config (see `_config_scaling`; a config that sets ``method.alpha_ratio`` gives that ratio even when r
    is unknown). None when unknown."""
    if "alpha" in record:
        alpha, rank = finite(record["alpha"]), finite(get_nested(record, "config", "method", "r"))
        return alpha / rank if alpha is not None and rank else None
    return _config_scaling(record)[1]


def record_model(record: Mapping[str, Any]) -> str | None:
    """The run's model label: the record's ``model``, else ``config.model.name``; None when neither is there."""
    model = record.get("model")
    if model is None:
        model = get_nested(record, "config", "model", "name")
    return None if model is None else str(model)


def computation_config(record: Mapping[str, Any]) -> dict[str, str]:
    """The record's config fields that change what the run computes (all but `NOT_COMPUTATION`), as
    ``section.field`` (or a top-level field) -> its value in compact JSON (a dict or list is one value)."""
    config = record.get("config")
    out: dict[str, Any] = {}
    for section, value in (config.items() if isinstance(config, dict) else ()):
        if section in NOT_COMPUTATION_SECTIONS:
            continue
        fields = value.items() if isinstance(value, dict) else [(None, value)]
        for name, v in fields:
            key = section if name is None else f"{section}.{name}"
            if key not in NOT_COMPUTATION:
                out[key] = json.dumps(v, sort_keys=True, separators=(",", ":"), default=str)
    return out


def config_differences(configs: Sequence[Mapping[str, str]]) -> dict[str, list[str]]:
    """Per field the `computation_config`s disagree on: its distinct values, in order of appearance. A field
    only some of them have (written before the field existed) is compared among those that have it."""
    values: dict[str, dict[str, None]] = {}
    for config in configs:
        for key, v in config.items():
            values.setdefault(key, {})[v] = None
    return {key: list(v) for key, v in values.items() if len(v) > 1}
