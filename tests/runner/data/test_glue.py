import re
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, DatasetDict

from adarank.runner.data import glue
from adarank.runner.data.glue import load_glue
from adarank.runner.data.tasks import get_task

FIXTURES = str(Path(__file__).parent / "fixtures" / "glue")

# task -> rows per split, and the first train row as the hub would show it
CASES = {
    "sst2": ({"train": 5, "validation": 3},
             {"sentence": "hide new secretions from the parental units ", "label": 0}),
    "cola": ({"train": 4, "validation": 3},
             {"sentence": "Our friends won't buy this analysis, let alone the next one we propose.", "label": 1}),
    "mrpc": ({"train": 4, "validation": 2},
             {"sentence1": "Amrozi accused his brother , whom he called \" the witness \" , of deliberately "
                           "distorting his evidence .",
              "sentence2": "Referring to him as only \" the witness \" , Amrozi accused his brother of "
                           "deliberately distorting his evidence .",
              "label": 1}),
    "qnli": ({"train": 3, "validation": 3},
             {"question": "When did the third Digimon series begin?",
              "sentence": "Unlike the two seasons before it and most of the seasons that followed, Digimon Tamers "
                          "takes a darker and more realistic approach.",
              "label": 1}),
    "rte": ({"train": 3, "validation": 2},
            {"sentence1": "No Weapons of Mass Destruction Found in Iraq Yet.",
             "sentence2": "Weapons of Mass Destruction Found in Iraq.", "label": 1}),
    "stsb": ({"train": 4, "validation": 2},
             {"sentence1": "A plane is taking off.", "sentence2": "An air plane is taking off.", "label": 5.0}),
    "mnli": ({"train": 4, "validation_matched": 3, "validation_mismatched": 2},
             {"premise": "Conceptually cream skimming has two basic dimensions - product and geography.",
              "hypothesis": "Product and geography are what make cream skimming work.", "label": 1}),
    "qqp": ({"train": 3, "validation": 3},
            {"question1": "How is the life of a math student? Could you describe your own experiences?",
             "question2": "Which level of prepration is enough for the exam jlpt5?", "label": 0}),
}

LABELS = {  # every label of each split, in hub ids
    "sst2": {"train": [0, 0, 1, 1, 0], "validation": [1, 0, 1]},
    "cola": {"train": [1, 1, 0, 1], "validation": [1, 0, 1]},
    "mrpc": {"train": [1, 0, 1, 0], "validation": [1, 0]},
    "qnli": {"train": [1, 1, 0], "validation": [0, 1, 1]},
    "rte": {"train": [1, 0, 0], "validation": [1, 0]},
    "stsb": {"train": [5.0, 3.8, 3.8, 0.0], "validation": [5.0, 4.75]},
    "mnli": {"train": [1, 0, 0, 2], "validation_matched": [1, 2, 0], "validation_mismatched": [2, 1]},
    "qqp": {"train": [0, 1, 0], "validation": [0, 0, 1]},
}


@pytest.mark.parametrize("name", list(CASES))
def test_local_tsv(name):
    task = get_task(name)
    counts, first = CASES[name]
    dd = load_glue(task, FIXTURES)
    assert list(dd) == ["train", *task.dev_splits]
    assert {s: len(d) for s, d in dd.items()} == counts
    for split, d in dd.items():
        assert d.column_names == [*task.text_fields, "label", "idx"]
        assert list(d["idx"]) == list(range(len(d)))
        assert list(d["label"]) == pytest.approx(LABELS[name][split])
    row = dd["train"][0]
    assert {k: row[k] for k in task.text_fields} == {k: first[k] for k in task.text_fields}
    assert row["label"] == pytest.approx(first["label"])
    label = dd["train"].features["label"]
    if task.is_regression:
        assert label.dtype == "float32"
    else:
        assert isinstance(label, ClassLabel) and tuple(label.names) == task.label_names


def test_stray_quotes_and_no_header_tail():
    cola = load_glue(get_task("cola"), FIXTURES)["validation"]
    # CoLA dev: no header, stray quotes kept verbatim, last line without a newline still read
    assert cola[2]["sentence"] == 'John said "I will go.'
    mrpc = load_glue(get_task("mrpc"), FIXTURES)["validation"]
    assert mrpc[0]["sentence2"].startswith('" The foodservice')


def test_env_var_is_used(monkeypatch):
    monkeypatch.setenv("ADARANK_DATA", FIXTURES)
    assert len(load_glue(get_task("sst2"), None)["train"]) == 5


def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.dir") as e:
        load_glue(get_task("rte"), str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere" / "RTE") in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    (tmp_path / "MNLI").mkdir()
    (tmp_path / "MNLI" / "train.tsv").write_text("x\n")
    with pytest.raises(FileNotFoundError, match=r"data\.dir: missing GLUE file .*dev_matched\.tsv"):
        load_glue(get_task("mnli"), str(tmp_path))


def test_bad_row_and_bad_label(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\nfine\t1\ntab\tin\t0\n")
    with pytest.raises(ValueError, match=r"train\.tsv:3: expected 2 tab-separated fields, got 3"):
        load_glue(get_task("sst2"), str(tmp_path))
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\nfine\t2\n")
    with pytest.raises(ValueError, match="bad sst2 label '2'"):
        load_glue(get_task("sst2"), str(tmp_path))


def test_hub_path(monkeypatch):
    calls = []

    def fake_load_dataset(hub_id, config):
        calls.append((hub_id, config))
        part = Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "label": [0], "idx": [0]})
        return DatasetDict({s: part for s in ("train", "validation_matched", "validation_mismatched",
                                              "test_matched", "test_mismatched")})

    monkeypatch.delenv("ADARANK_DATA", raising=False)
    monkeypatch.setattr(glue, "load_dataset", fake_load_dataset)
    dd = load_glue(get_task("mnli"), None)
    assert calls == [("nyu-mll/glue", "mnli")]
    assert list(dd) == ["train", "validation_matched", "validation_mismatched"]


def test_rejects_non_glue_task():
    with pytest.raises(ValueError, match="not a GLUE task"):
        load_glue(get_task("tweets"), FIXTURES)


def _sst2(tmp_path, train: bytes, dev: bytes = b"sentence\tlabel\nok\t1\n") -> str:
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_bytes(train)
    (tmp_path / "SST-2" / "dev.tsv").write_bytes(dev)
    return str(tmp_path)


@pytest.mark.parametrize("train", [b"", b"sentence\tlabel\n", b"\n\n"])
def test_a_file_without_data_rows_is_named(tmp_path, train):
    with pytest.raises(ValueError, match=r"SST-2/train\.tsv: no data rows \(the file is empty or holds only a header\)$"):
        load_glue(get_task("sst2"), _sst2(tmp_path, train))


def test_an_empty_dev_file_is_named_too(tmp_path):
    with pytest.raises(ValueError, match=r"SST-2/dev\.tsv: no data rows"):
        load_glue(get_task("sst2"), _sst2(tmp_path, b"sentence\tlabel\nok\t1\n", dev=b""))


def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"SST-2/train\.tsv:3: not UTF-8 text \(byte 0xe9 at offset 23\)$"):
        load_glue(get_task("sst2"), _sst2(tmp_path, b"sentence\tlabel\nok\t1\ncaf\xe9\t0\n"))


@pytest.mark.parametrize("header,message", [
    (b"label\n", "the header has 1 columns, the task needs at least 2"),
    (b"x\tsentence\tlabel\n", "column 1 of the header is 'x', expected 'sentence'"),
    (b"text\tlabel\n", "column 1 of the header is 'text', expected 'sentence'"),
])
def test_a_header_that_is_not_the_official_one_is_named(tmp_path, header, message):
    width = header.count(b"\t") + 1
    row = b"\t".join([b"a"] * (width - 1) + [b"1"]) + b"\n"
    with pytest.raises(ValueError, match=rf"SST-2/train\.tsv:1: {re.escape(message)}"):
        load_glue(get_task("sst2"), _sst2(tmp_path, header + row))


def test_a_shifted_mnli_label_column_is_named(tmp_path):
    (tmp_path / "MNLI").mkdir()
    for name in get_task("mnli").tsv.files:
        text = (Path(FIXTURES) / "MNLI" / name).read_text()
        if name == "train.tsv":  # an extra column at the end: the last one is no longer gold_label
            text = "".join(line + "\tx\n" for line in text.rstrip("\n").split("\n"))
        (tmp_path / "MNLI" / name).write_text(text)
    with pytest.raises(ValueError, match=r"train\.tsv:1: column 13 of the header is 'x', expected 'gold_label'"):
        load_glue(get_task("mnli"), str(tmp_path))


def test_the_data_dir_may_start_with_a_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _sst2(tmp_path, b"sentence\tlabel\nok\t1\n")
    assert len(load_glue(get_task("sst2"), "~")["train"]) == 1


def test_the_hub_being_out_of_reach_names_data_dir(monkeypatch):
    def offline(hub_id, config):
        raise ConnectionError(f"Couldn't reach '{hub_id}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.delenv("ADARANK_DATA", raising=False)
    monkeypatch.setattr(glue, "load_dataset", offline)
    with pytest.raises(OSError) as e:
        load_glue(get_task("rte"), None)
    assert str(e.value) == ("data.dir: not set (nor $ADARANK_DATA), and nyu-mll/glue (rte) cannot be loaded from the "
                            "hub: Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled); point data.dir at "
                            "a local GLUE folder")


@pytest.mark.parametrize("train,message", [
    (b"sentence\tlabel\nok\t1\nnul\x00\t0\n", r"train\.tsv:3: a NUL byte, so not a text file$"),
    (b"sentence\tlabel\nok\t1\n" + b"a" * 200_000 + b"\t0\n", r"train\.tsv:3: not a GLUE TSV row \(field larger than"),
])
def test_binary_looking_content_names_the_file_and_line(tmp_path, train, message):
    with pytest.raises(ValueError, match=message):
        load_glue(get_task("sst2"), _sst2(tmp_path, train))
