"""Load a GLUE task from the official TSV files or from the Hugging Face hub, with the hub's columns."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_dataset

from .tasks import TaskSpec, TsvLayout

DATA_ENV = "ADARANK_DATA"


def load_glue(task: TaskSpec, data_dir: str | None) -> DatasetDict:
    """Return splits `train` and `task.dev_splits` of a GLUE task.

    Reads `data_dir/<task.glue_dir>/*.tsv` when `data_dir` (or else the env var ADARANK_DATA) is set,
    and downloads `nyu-mll/glue` from the hub otherwise.
    """
    if task.source != "glue" or task.tsv is None:
        raise ValueError(f"task: {task.name!r} is not a GLUE task")
    data_dir = data_dir or os.environ.get(DATA_ENV) or None
    if data_dir is None:
        return _load_hub(task)
    return _load_local(task, Path(data_dir))


def _load_hub(task: TaskSpec) -> DatasetDict:
    dd = load_dataset(task.hub_id, task.hub_config)
    return DatasetDict({split: dd[split] for split in ("train", *task.dev_splits)})


def _load_local(task: TaskSpec, data_dir: Path) -> DatasetDict:
    assert task.tsv is not None and task.glue_dir is not None
    folder = data_dir / task.glue_dir
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data.dir: no GLUE folder {folder} (data.dir must hold {task.glue_dir}/ as written by "
            f"download_glue_data.py; leave data.dir empty to load {task.hub_id} from the hub)"
        )
    features = _features(task)
    splits = ("train", *task.dev_splits)
    return DatasetDict({
        split: Dataset.from_dict(_read_split(task, folder / name), features=features)
        for split, name in zip(splits, task.tsv.files)
    })


def _features(task: TaskSpec) -> Features:
    """The hub's features: text columns, the label (ClassLabel, or float32 for STS-B) and the row index."""
    label = Value("float32") if task.is_regression else ClassLabel(names=list(task.label_names))
    return Features({**{f: Value("string") for f in task.text_fields}, "label": label, "idx": Value("int32")})


def _read_split(task: TaskSpec, path: Path) -> dict[str, list]:
    assert task.tsv is not None
    layout = task.tsv
    rows = read_tsv(path, layout)
    columns: dict[str, list] = {f: [r[c] for r in rows] for f, c in zip(task.text_fields, layout.text_columns)}
    columns["label"] = [_parse_label(task, r[layout.label_column], path, i) for i, r in enumerate(rows)]
    columns["idx"] = list(range(len(rows)))
    return columns


def read_tsv(path: Path, layout: TsvLayout) -> list[list[str]]:
    """Read the data rows of one GLUE TSV file, checking that every row has the same number of fields."""
    if not path.is_file():
        raise FileNotFoundError(f"data.dir: missing GLUE file {path}")
    # utf-8-sig drops the BOM that download_glue_data.py writes before MRPC's header. QUOTE_NONE because
    # GLUE text has unbalanced quotes (e.g. MRPC's `" The foodservice ...`) that are part of the sentence.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        numbered = [(reader.line_num, row) for row in reader if row]
    if layout.header and numbered:
        width, numbered = len(numbered[0][1]), numbered[1:]
    else:
        width = layout.num_columns
    for line, row in numbered:
        if len(row) != width:
            raise ValueError(f"{path}:{line}: expected {width} tab-separated fields, got {len(row)}")
    return [row for _, row in numbered]


def _parse_label(task: TaskSpec, raw: str, path: Path, row: int) -> int | float:
    """Turn a TSV label into the hub's value: a class id in ClassLabel order, or a float score."""
    assert task.tsv is not None
    fmt = task.tsv.label_format
    try:
        if fmt == "float":
            return float(raw)
        label = task.label_names.index(raw) if fmt == "name" else int(raw)
    except ValueError:
        label = -1
    if not 0 <= label < task.num_labels:
        raise ValueError(f"{path}: data row {row + 1}: bad {task.name} label {raw!r}")
    return label
