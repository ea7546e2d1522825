import pytest

from adarank.runner.data.tasks import TASKS, TaskSpec, get_task

GLUE = ["sst2", "cola", "mrpc", "qnli", "rte", "stsb", "mnli", "qqp"]


def test_registry_has_glue_tweets_and_bbc():
    assert set(TASKS) == {*GLUE, "tweets", "bbc"}
    bbc = TASKS["bbc"]
    assert bbc.is_causal and not bbc.higher_is_better and bbc.main_metric == "ppl"
    assert all(TASKS[n].higher_is_better and not TASKS[n].is_causal for n in (*GLUE, "tweets"))
    for name in GLUE:
        t = TASKS[name]
        assert (t.hub_id, t.hub_config, t.source) == ("nyu-mll/glue", name, "glue")
        assert t.tsv is not None and len(t.tsv.files) == 1 + len(t.dev_splits)


@pytest.mark.parametrize("name, main, labels", [
    ("sst2", "accuracy", ("negative", "positive")),
    ("cola", "matthews", ("unacceptable", "acceptable")),
    ("mrpc", "f1", ("not_equivalent", "equivalent")),
    ("qnli", "accuracy", ("entailment", "not_entailment")),
    ("rte", "accuracy", ("entailment", "not_entailment")),
    ("stsb", "pearson", ()),
    ("mnli", "accuracy", ("entailment", "neutral", "contradiction")),
    ("qqp", "f1", ("not_duplicate", "duplicate")),
    ("tweets", "accuracy", ("negative", "neutral", "positive")),
])
def test_main_metric_and_hub_label_order(name, main, labels):
    t = get_task(name)
    assert t.main_metric == main and t.main_metric in t.metrics
    assert t.label_names == labels
    assert t.num_labels == (len(labels) or 1)
    assert t.is_regression == (name == "stsb")


def test_dev_splits():
    assert get_task("mnli").dev_splits == ("validation_matched", "validation_mismatched")
    assert get_task("mnli").tsv.files == ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv")
    for name in set(GLUE) - {"mnli"}:
        assert get_task(name).dev_splits == ("validation",)
    assert get_task("tweets").dev_splits == ("validation", "test")


def test_unknown_task():
    with pytest.raises(ValueError, match=r"task: unknown task 'x'; choose one of sst2, cola"):
        get_task("x")


def test_spec_validation():
    with pytest.raises(ValueError, match="main_metric"):
        TaskSpec(name="t", source="glue", text_fields=("s",), num_labels=2, label_names=("a", "b"),
                 metrics=("accuracy",), main_metric="f1", dev_splits=("validation",))
    with pytest.raises(ValueError, match="num_labels"):
        TaskSpec(name="t", source="glue", text_fields=("s",), num_labels=3, label_names=("a", "b"),
                 metrics=("accuracy",), main_metric="accuracy", dev_splits=("validation",))


def test_every_glue_header_layout_names_its_text_and_label_columns():
    from adarank.runner.data.tasks import TsvLayout

    for name in GLUE:
        layout = get_task(name).tsv
        assert bool(layout.header_names) == layout.header, name  # CoLA alone has no header
    assert get_task("mnli").tsv.min_columns == 11  # text in columns 8 and 9, the label after them
    assert get_task("mrpc").tsv.min_columns == 5
    with pytest.raises(ValueError, match="header_names: one name per text column"):
        TsvLayout(("t.tsv",), text_columns=(0,), label_column=1, label_format="int", header_names=("sentence",))
