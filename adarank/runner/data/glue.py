"""Load a GLUE task from the official TSV files or from the Hugging Face hub, with the hub's columns."""

from __future__ import annotations

import csv
import io
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
    return _load_local(task, Path(data_dir).expanduser())


def _load_hub(task: TaskSpec) -> DatasetDict:
    try:
        dd = load_dataset(task.hub_id, task.hub_config)
    except OSError as e:  # offline, unreachable, or not in the cache: say which setting would avoid the hub
        raise OSError(
            f"data.dir: not set (nor ${DATA_ENV}), and {task.hub_id} ({task.hub_config}) cannot be loaded from "
            f"the hub: {e}; point data.dir at a local GLUE folder"
        ) from None
    return DatasetDict({split: dd[split] for split in ("train", *task.dev_splits)})


def _load_local(task: TaskSpec, data_dir: Path) -> DatasetDict:
    assert task.tsv is not None and task.glue_dir is not None
    folder = data_dir / task.glue_dir
    if data_dir.is_dir() and not os.access(data_dir, os.R_OK | os.X_OK):
        raise PermissionError(f"data.dir: {data_dir} is not readable")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"data.dir: no GLUE folder {folder} (data.dir must hold {task.glue_dir}/ as written by "
            f"download_glue_data.py; leave data.dir empty to load {task.hub_id} from the hub)"
        )
    paths = {split: folder / name for split, name in zip(("train", *task.dev_splits), task.tsv.files)}
    columns = {split: _read_split(task, path) for split, path in paths.items()}
    for split, path in paths.items():  # after every file was found: a folder short of files says so first
        if not columns[split]["idx"]:
            raise ValueError(f"{path}: no data rows (the file is empty or holds only a header)")
    features = _features(task)
    return DatasetDict({split: Dataset.from_dict(cols, features=features) for split, cols in columns.items()})


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
    """Read the data rows of one GLUE TSV file, checking that every row has the same number of fields.

    Every problem is a one-line error naming the file (and the line where there is one): a missing or
    unreadable file, bytes that are not UTF-8 text, a header that is not the official one
    (`layout.header_names`) or has too few columns for the task, a row of another width. A file without
    data rows gives an empty list (`load_glue` reports it once it has found every file of the task).
    """
    numbered = _tsv_rows(path)
    if layout.header and numbered:
        (_, header), numbered = numbered[0], numbered[1:]
        if numbered:  # a header alone is reported as a file without data rows, not as a bad header
            _check_header(path, header, layout)
        width = len(header)
    else:
        width = layout.num_columns
    for line, row in numbered:
        if len(row) != width:
            raise ValueError(f"{path}:{line}: expected {width} tab-separated fields, got {len(row)}")
    return [row for _, row in numbered]


def _tsv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every non-empty row of a TSV file."""
    if not path.is_file():
        raise FileNotFoundError(f"data.dir: missing GLUE file {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise OSError(f"{path}: cannot be read ({e.strerror or e})") from None
    if b"\0" in raw:  # valid UTF-8, but never in text: a binary or corrupted file
        line = raw[: raw.index(b"\0")].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: a NUL byte, so not a text file")
    # utf-8-sig drops the BOM that download_glue_data.py writes before MRPC's header
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    # newline="" as csv wants; QUOTE_NONE because GLUE text has unbalanced quotes (e.g. MRPC's
    # `" The foodservice ...`) that are part of the sentence
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        return [(reader.line_num, row) for row in reader if row]
    except csv.Error as e:  # e.g. a field over csv's size limit: not a TSV file of sentences
        raise ValueError(f"{path}:{reader.line_num}: not a GLUE TSV row ({e})") from None


def _check_header(path: Path, header: list[str], layout: TsvLayout) -> None:
    """The header holds the task's columns where the official layout has them."""
    if len(header) < layout.min_columns:
        raise ValueError(f"{path}:1: the header has {len(header)} columns, the task needs at least {layout.min_columns}")
    for col, name in zip((*layout.text_columns, layout.label_column), layout.header_names):
        got = header[col].strip()
        if got != name:
            pos = len(header) if col < 0 else col + 1
            raise ValueError(f"{path}:1: column {pos} of the header is {got!r}, expected {name!r} (the official GLUE layout)")


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
