"""Fuzzing the runner's contract: bad input gets one clear line naming the field or file, before any model
loads; no tracebacks for user mistakes.

The cases are generated, not listed:
  1. every field of every config dataclass, found by introspection from `Config` (so a field added later is
     covered without editing this file): values of a wrong type, and out-of-range or unknown candidates;
  2. each GLUE task's train and dev files, copied from the fixtures and damaged one way at a time;
  3. paths: data.dir, model.name_or_path, model.tokenizer.
A rejected input must give exactly one line naming the field (`section.field`) or the file; an accepted
candidate must reach the typed config that preflight checks unchanged (valid values of some candidates, e.g.
0 for a field that allows it, are fine). Nothing may raise a traceback or load model weights.

The field cases go through `prevalidate` (what `main` runs first; one composition each), the data and path
cases through `main` in-process, which prints the line and exits with EXIT_USAGE.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import time
import typing
from pathlib import Path

import pytest

import adarank.runner.models
import adarank.runner.train
from adarank.runner import cli
from adarank.runner.config import Config
from adarank.runner.data.tasks import TASKS

from e2e import GLUE_FIXTURES, TINY


# ---- shared ------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """Fail the test if a run starts or any model weights load: every input here is checked before that."""

    def forbidden(*args, **kwargs):
        pytest.fail("a model was loaded or training started for an input that must be rejected before")

    monkeypatch.setattr(adarank.runner.train, "train", forbidden)
    for name in ("load_model", "load_causal_lm"):
        monkeypatch.setattr(adarank.runner.models, name, forbidden)
        monkeypatch.setattr(adarank.runner.train, name, forbidden)


def names(line: str, key: str) -> bool:
    """Whether `line` names the field or file `key` as a whole (method.r is not named by method.rslora)."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", line) is not None


def run_main(args: list[str], capsys) -> tuple[int | None, list[str]]:
    """`python -m adarank.run ARGS` in-process: its exit code and its stderr lines."""
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return info.value.code, err.splitlines()


def rejected_line(args: list[str], capsys) -> str:
    """The one error line of a rejected command line (asserting exit code 2 and the line's format)."""
    code, lines = run_main(args, capsys)
    assert code == cli.EXIT_USAGE, lines
    assert len(lines) == 1 and lines[0].startswith("adarank: error: "), lines
    return lines[0].removeprefix("adarank: error: ")


def prevalidated(args: list[str]) -> str | None:
    """prevalidate's verdict; any exception escaping it is the traceback the contract forbids."""
    try:
        return cli.prevalidate(args)
    except Exception as e:  # noqa: BLE001 - the point: no exception may escape for a user mistake
        pytest.fail(f"a traceback for a user mistake {args[len(TINY):]}: {type(e).__name__}: {e}")


# ---- 1. every field of every config dataclass ---------------------------------------------------------


def config_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, typing.Any]]:
    """(override key, type) of every leaf field, recursing into nested dataclasses."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += config_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", tp))
    return out


def _unwrap(tp: typing.Any) -> tuple[typing.Any, bool]:
    """(the type inside Optional[...], whether it was Optional)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return tp, False


#: per base type: values of a wrong type, then candidates of the right type that may be out of range
CANDIDATES: dict[typing.Any, tuple[tuple[str, ...], tuple[str, ...]]] = {
    bool: (("maybe", "[true]"), ("true", "false")),
    int: (("abc", "1.5", "[1]"), ("-1", "0", str(10**9), str(-(10**9)), str(2**32))),
    float: (("abc", "[1.0]"), ("-1", "0", "1", "1e9", "-1e9", "inf", "nan")),
    str: (("[a]", "{a: 1}"), ("nope", "''")),
    list: (("abc", "{a: 1}"), ("[]", "[nope]")),
    dict: (("abc", "[1]"), ("{nope: 1}",)),
}

#: fields typed `Any` (each accepts several forms), per field: wrong values, then candidates of a right form
FIELD_CANDIDATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "data.length_buckets": (("{a: 1}", "true"), ("pow2", "multiple:0", "[32]", "[]")),  # a form or a list
    "method.rank_pattern": (("[a]", "1"), ("nope", "{nope: 1}", "{}", "''")),  # a path or an inline mapping
}

#: generated cases whose fix belongs outside this suite's files: strict xfails, for the lead
FIELD_GAPS: dict[tuple[str, str], str] = {}


def field_cases() -> list:
    cases = []
    for key, tp in config_fields():
        base, optional = _unwrap(tp)
        if base is typing.Any:  # a new field of type Any needs its own entry
            wrong, candidates = FIELD_CANDIDATES[key]
        else:  # a new kind of field needs an entry
            wrong, candidates = CANDIDATES[typing.get_origin(base) or base]
        kinds = [("wrong", v) for v in wrong] + [("range", v) for v in candidates]
        kinds.append(("range" if optional else "wrong", "null"))  # null: valid for Optional, a type error else
        for kind, v in kinds:
            marks = [pytest.mark.xfail(strict=True, reason=FIELD_GAPS[key, v])] if (key, v) in FIELD_GAPS else []
            cases.append(pytest.param(key, v, kind, id=f"{key}={v}", marks=marks))
    return cases


FIELD_CASES = field_cases()


@pytest.fixture
def preflighted(monkeypatch) -> list[Config]:
    """The typed configs that prevalidate handed to preflight."""
    seen: list[Config] = []
    real = cli.preflight
    monkeypatch.setattr(cli, "preflight", lambda cfg: seen.append(cfg) or real(cfg))
    return seen


def _typed_value(cfg: Config, key: str) -> typing.Any:
    node: typing.Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _parsed(key: str, value: str) -> typing.Any:
    """The override's value as Hydra parses it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"{key}={value}").value()


@pytest.mark.parametrize("key,value,kind", FIELD_CASES)
def test_every_field_rejects_bad_values_in_one_line_naming_it(key, value, kind, preflighted):
    line = prevalidated([*TINY, f"{key}={value}"])
    if line is None:  # accepted: then consistently, i.e. the value reached the config that was checked
        assert kind == "range", f"{key}={value}: a value of the wrong type was accepted"
        got, want = _typed_value(preflighted[-1], key), _parsed(key, value)
        both_nan = isinstance(got, float) and isinstance(want, float) and math.isnan(got) and math.isnan(want)
        assert got == want or both_nan, f"{key}={value} was accepted as {got!r}"
        return
    assert "\n" not in line and line.strip() == line and line, repr(line)
    assert names(line, key), f"{key}={value} was rejected without naming {key}: {line!r}"


def test_the_generator_covers_every_field():
    keys = {k for k, _ in config_fields()}
    assert {"seed", "model.name_or_path", "method.target_params", "train.cuda_graph_shapes", "wandb.mode"} <= keys
    assert {p.values[0] for p in FIELD_CASES} == keys
    assert len(FIELD_CASES) >= 6 * len(keys)


# ---- 2. damaged data files ----------------------------------------------------------------------------


def _lines(text: str) -> list[str]:
    return text.rstrip("\n").split("\n")


def _cut_last_line(text: str) -> str:
    """Truncated mid-line: the file stops inside its last row, before that row's last field."""
    lines = _lines(text)
    lines[-1] = lines[-1][: lines[-1].rindex("\t")]
    return "\n".join(lines)


def _drop_first_column(text: str) -> str:
    return "\n".join(line.split("\t", 1)[1] for line in _lines(text)) + "\n"


def _not_utf8(raw: bytes) -> bytes:
    """A byte that is never UTF-8 in the middle of the last row."""
    start = raw.rstrip(b"\n").rfind(b"\n") + 1
    mid = (start + len(raw.rstrip(b"\n"))) // 2
    return raw[:mid] + b"\xff" + raw[mid:]


#: damage -> what it does to a file's bytes (None: the file is deleted)
DAMAGES: dict[str, typing.Callable[[bytes], bytes] | None] = {
    "truncated_mid_line": lambda raw: _cut_last_line(raw.decode()).encode(),
    "empty": lambda raw: b"",
    "header_only": lambda raw: raw.split(b"\n", 1)[0] + b"\n",
    "not_utf8": _not_utf8,
    "missing_column": lambda raw: _drop_first_column(raw.decode()).encode(),
    "extra_column": lambda raw: "".join(f"x\t{line}\n" for line in _lines(raw.decode())).encode(),
    "ragged_row": lambda raw: raw.rstrip(b"\n") + b"\tx\n",
    "oversized_field": lambda raw: raw + b"a" * 200_000 + b"\n",  # over csv's field size limit
    "nul_bytes": lambda raw: raw.replace(b"\t", b"\t\x00", 1),
    "missing_file": None,
}

GLUE_TASKS = [name for name, t in TASKS.items() if t.source == "glue"]


def _data_cases() -> list:
    cases = []
    for name in GLUE_TASKS:
        layout = TASKS[name].tsv
        for fname in layout.files:
            for damage in DAMAGES:
                if damage == "header_only" and not layout.header:
                    continue  # CoLA's files have no header
                cases.append(pytest.param(name, fname, damage, id=f"{name}-{fname}-{damage}"))
    return cases


def glue_copy(tmp_path: Path, task: str) -> Path:
    """data.dir holding a fresh copy of the task's fixture folder."""
    folder = TASKS[task].glue_dir
    shutil.copytree(Path(GLUE_FIXTURES) / folder, tmp_path / "glue" / folder)
    return tmp_path / "glue"


def glue_args(tmp_path: Path, task: str, data_dir: Path) -> list[str]:
    # the fixtures hold 1-5 rows per file: a half of train is held out so both parts are non-empty
    return [*TINY, f"task={task}", f"data.dir={data_dir}", "data.val_fraction=0.5", f"hydra.run.dir={tmp_path / 'run'}"]


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_the_undamaged_fixtures_pass(tmp_path, task):
    assert prevalidated(glue_args(tmp_path, task, glue_copy(tmp_path, task))) is None


@pytest.mark.parametrize("task,fname,damage", _data_cases())
def test_a_damaged_data_file_is_one_line_naming_it(tmp_path, capsys, task, fname, damage):
    data_dir = glue_copy(tmp_path, task)
    path = data_dir / TASKS[task].glue_dir / fname
    damaged = DAMAGES[damage]
    if damaged is None:
        path.unlink()
    else:
        path.write_bytes(damaged(path.read_bytes()))
    line = rejected_line(glue_args(tmp_path, task, data_dir), capsys)
    assert f"{TASKS[task].glue_dir}/{fname}" in line, line
    assert not line.startswith("data.val_fraction"), line  # the file is at fault, not the split
    assert not (tmp_path / "run").exists()  # stopped before Hydra ran the job


# ---- 3. paths -----------------------------------------------------------------------------------------


@pytest.fixture
def no_hub(monkeypatch):
    """Fail the test if transformers is asked for a config or tokenizer (the hub, or a folder)."""
    import transformers

    def forbidden(*args, **kwargs):
        pytest.fail(f"transformers was asked for {args[:1]}: a bad path must be rejected without trying the hub")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", forbidden)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", forbidden)


def test_data_dir_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "glue.tsv"
    f.write_text("x\n")
    line = rejected_line([*TINY, "task=sst2", f"data.dir={f}"], capsys)
    assert line.startswith("data.dir: ") and str(f) in line


def test_data_dir_that_does_not_exist(tmp_path, capsys):
    line = rejected_line([*TINY, "task=sst2", f"data.dir={tmp_path / 'nowhere'}"], capsys)
    assert line.startswith("data.dir: ") and str(tmp_path / "nowhere") in line


def test_data_dir_without_the_task_folder(tmp_path, capsys):
    line = rejected_line([*TINY, "task=rte", f"data.dir={glue_copy(tmp_path, 'sst2')}"], capsys)
    assert line.startswith("data.dir: no GLUE folder") and "RTE" in line


def test_data_dir_under_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    glue_copy(tmp_path, "sst2")
    assert prevalidated([*TINY, "task=sst2", "data.dir='~/glue'", "data.val_fraction=0.5"]) is None


def test_no_data_dir_and_no_hub_names_data_dir(monkeypatch, capsys):
    import adarank.runner.data.glue

    def offline(hub_id, config):  # what datasets raises offline
        raise ConnectionError(f"Couldn't reach '{hub_id}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.delenv("ADARANK_DATA", raising=False)
    monkeypatch.setattr(adarank.runner.data.glue, "load_dataset", offline)
    line = rejected_line([*TINY, "task=mrpc", "data.dir=null"], capsys)
    assert line.startswith("data.dir: not set (nor $ADARANK_DATA), and nyu-mll/glue (mrpc) cannot be loaded"), line


@pytest.mark.parametrize("target", ["dir", "file"])
def test_unreadable_data(tmp_path, capsys, target):
    data_dir = glue_copy(tmp_path, "sst2")
    victim = data_dir if target == "dir" else data_dir / "SST-2" / "train.tsv"
    victim.chmod(0)
    try:
        if os.access(victim, os.R_OK):
            pytest.skip("chmod 000 does not stop this user (root) from reading")
        line = rejected_line([*TINY, "task=sst2", f"data.dir={data_dir}", "data.val_fraction=0.5"], capsys)
        assert str(victim) in line and ("not readable" in line or "cannot be read" in line), line
    finally:
        victim.chmod(0o755)


@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize("path", ["./nope", "../nope/model", "~/no-such-adarank-model"])
def test_a_model_path_that_does_not_exist_is_rejected_at_once(capsys, path):
    start = time.perf_counter()
    line = rejected_line([*TINY, f"model.name_or_path='{path}'"], capsys)  # quoted: ~ is Hydra syntax
    assert line == f"model.name_or_path: {path} is not a directory"
    assert time.perf_counter() - start < 10  # no retries against a hub


def test_a_model_folder_without_a_config_names_the_field(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    line = rejected_line([*TINY, f"model.name_or_path={tmp_path / 'model'}"], capsys)
    assert line.startswith("model.name_or_path: cannot read a model config from"), line


def test_a_hub_id_that_cannot_be_found_names_the_field(monkeypatch, capsys):
    import transformers

    def offline(name, *args, **kwargs):  # what transformers raises offline (or for an unknown id online)
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}.\nCheck your connection.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    line = rejected_line([*TINY, "model.name_or_path=nobody/no-such-model"], capsys)
    assert line.startswith("model.name_or_path: cannot read a model config from 'nobody/no-such-model'"), line


@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize("path", ["./nope", "/nonexistent/tokenizer"])
def test_a_tokenizer_path_that_does_not_exist_names_model_tokenizer(capsys, path):
    line = rejected_line([*TINY, f"model.tokenizer='{path}'"], capsys)
    assert line == f"model.tokenizer: {path} is not a directory"


def test_a_tokenizer_hub_id_that_cannot_be_found_names_model_tokenizer(tmp_path, capsys):
    line = rejected_line([*TINY, "model.tokenizer=nobody/no-such-tokenizer", f"hydra.run.dir={tmp_path / 'run'}"], capsys)
    assert line.startswith("model.tokenizer: ")


# ---- known cases (the issue) --------------------------------------------------------------------------


def test_a_negative_seed_names_seed(capsys):
    assert rejected_line([*TINY, "seed=-1"], capsys) == "seed: must be in [0, 2**32), got -1"


@pytest.mark.parametrize("method", ["lora", "rslora", "full", "peft_lora"])
@pytest.mark.parametrize("budget", ["target_params=1000", "target_total_rank=10"])
def test_an_adaptive_budget_for_a_fixed_rank_method_is_rejected(capsys, method, budget):
    if method == "peft_lora":
        pytest.importorskip("peft")
    line = rejected_line([*TINY, f"method={method}", f"method.{budget}"], capsys)
    assert line.startswith(f"method.{budget.split('=')[0]}: only for the adaptive methods"), line


@pytest.mark.parametrize("method", ["lora", "rslora", "full", "adalora"])
def test_the_method_defaults_stay_accepted(method):
    assert prevalidated([*TINY, f"method={method}"]) is None


def test_an_explicit_budget_below_one_names_its_field(capsys):
    line = rejected_line([*TINY, "method.target_params=0"], capsys)
    assert line == "method.target_params: must be >= 1 or null, got 0"


def test_a_parameter_budget_too_small_for_one_triplet_names_target_params(capsys):
    line = rejected_line([*TINY, "method.target_params=1"], capsys)
    assert line.startswith("method.target_params: "), line


def test_a_header_only_train_file_does_not_blame_val_fraction(tmp_path, capsys):
    data_dir = glue_copy(tmp_path, "sst2")
    (data_dir / "SST-2" / "train.tsv").write_text("sentence\tlabel\n")
    line = rejected_line([*TINY, "task=sst2", f"data.dir={data_dir}"], capsys)
    assert line == f"{data_dir / 'SST-2' / 'train.tsv'}: no data rows (the file is empty or holds only a header)"


def test_a_non_utf8_data_file_names_the_file_and_line(tmp_path, capsys):
    data_dir = glue_copy(tmp_path, "sst2")
    path = data_dir / "SST-2" / "dev.tsv"
    path.write_bytes(b"sentence\tlabel\nok\t1\ncaf\xe9\t0\n")
    line = rejected_line([*TINY, "task=sst2", f"data.dir={data_dir}", "data.val_fraction=0.5"], capsys)
    assert line.startswith(f"{path}:3: not UTF-8 text (byte 0xe9"), line


# ---- cases fixed in cli.py ---------------------------------------------------------------------------


def test_an_output_dir_that_cannot_be_created_names_it(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = rejected_line([*TINY, f"hydra.run.dir={blocker / 'run'}"], capsys)
    assert str(blocker / "run") in line


def test_a_yaml_syntax_error_in_an_experiment_file_names_the_file_and_line(tmp_path, capsys):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    bad = tmp_path / "conf" / "experiment" / "broken.yaml"
    bad.write_text("# @package _global_\nexperiment_name: broken\ntrain:\n  lr: [1, 2\n")
    line = rejected_line([*TINY, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "+experiment=broken"], capsys)
    assert "broken.yaml" in line and "line 4" in line, line
