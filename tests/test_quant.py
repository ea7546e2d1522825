"""model.quantization=nf4 (adarank/quant.py): adapters over torchao NF4 bases on the tiny Llama, on the CPU."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

import adarank
from adarank.export import export_peft
from adarank.quant import is_quantized, nbytes, quantize_nf4_
from adarank.shrink import shrink_layers

from conftest import tiny_llama

#: the tests that quantize; the config and preflight refusals below need no torchao
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="model.quantization=nf4 needs torchao (pip install 'adarank[quant]')")

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))


@needs_torchao
def test_nf4_base_is_smaller_and_its_output_close_to_the_dense_one():
    dense, quant = tiny_llama(), tiny_llama()
    before = sum(nbytes(m.weight) for m in quant.modules() if type(m) is torch.nn.Linear)
    rep = quantize_nf4_(quant)
    assert rep.quantized and all(is_quantized(quant.get_submodule(n).weight) for n in rep.quantized)
    assert not is_quantized(quant.get_output_embeddings().weight)  # tied to the input embedding: stays dense
    assert rep.bytes_after < rep.bytes_before / 3 and rep.bytes_before < before  # lm_head stays dense
    with torch.no_grad():
        a, b = dense(_ids()).logits, quant(_ids()).logits
    err = (a - b).abs().max() / a.abs().max()
    assert 0 < err < 0.2  # 4-bit rounding: different, but close


@needs_torchao
@pytest.mark.parametrize("kind", ["lora", "svd"])
def test_adapters_over_nf4_train_mask_shrink_export_and_refuse_merge(tmp_path, kind):
    model = tiny_llama()
    quantize_nf4_(model)
    adarank.inject(model, kind, r=4, alpha=8, targets=TARGETS, fused=True)  # fused steps aside for NF4 bases
    from adarank.inject import adapters, svd_adapters

    layers = [m for _, m in adapters(model)]
    assert all(is_quantized(m.base.weight) for m in layers)
    if kind == "svd":
        for m in layers:
            torch.nn.init.normal_(m.lam)
    model(_ids(), labels=_ids()).loss.backward()
    assert all(p.grad is not None for m in layers for p in m.parameters() if p.requires_grad)
    if kind == "svd":
        svd = [m for _, m in svd_adapters(model)]
        shrink_layers(svd, [torch.arange(4) < 2 for _ in svd])
        assert all(m.r == 2 for m in svd)
        model(_ids())  # still runs after the shrink
    ranks = export_peft(model, str(tmp_path / "adapter"))
    assert set(ranks.values()) == {2 if kind == "svd" else 4}
    with pytest.raises(ValueError, match="merge: the base weight is NF4"):
        layers[0].merge()


def test_torchaos_notes_on_its_cpp_extensions_are_dropped_and_its_other_records_kept(caplog):
    log = logging.getLogger("torchao")
    with caplog.at_level(logging.WARNING, logger="torchao"):
        log.warning("Failed to load /site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load")
        log.warning("Skipping import of cpp extensions due to TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1")
        log.warning("Failed to load a quantization config")
    assert [r.getMessage() for r in caplog.records] == ["Failed to load a quantization config"]


# --- through the runner: the config field, its refusals and a run -------------------------------------------

import json  # noqa: E402

import adarank.runner.cli  # noqa: E402
from adarank.runner import config as C  # noqa: E402

from e2e import TINY, compose_config, run  # noqa: E402


def _nf4_config(tmp_path, *extra: str):
    base = ["model=tiny_llama" if o == "model=tiny_random" else o for o in TINY]
    return adarank.runner.cli.to_config(compose_config([
        *base, "task=bbc", "task.max_length=32", "train.max_steps=8", "train.eval_every=4", "model.quantization=nf4",
        "data.max_train_samples=24", "data.max_eval_samples=8", f"data.cache_dir={tmp_path / 'cache'}", *extra]))


def test_an_unknown_quantization_is_refused_naming_the_field():
    with pytest.raises(ValueError, match=r"^model\.quantization: must be one of"):
        C.ModelConfig(quantization="int3")


@pytest.mark.parametrize("method", ["full", "peft_lora", "peft_adalora"])
def test_nf4_is_refused_for_methods_that_train_or_wrap_the_base_themselves(tmp_path, method):
    with pytest.raises(ValueError, match=rf"^model\.quantization: nf4 freezes the base .* not {method}$"):
        _nf4_config(tmp_path, f"method={method}", "method.r=2")


def test_preflight_without_torchao_says_how_to_install_it(tmp_path, monkeypatch):
    cfg = _nf4_config(tmp_path, "method=lora", "method.r=2")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ValueError, match=r"^model\.quantization: nf4 needs torchao \(pip install 'adarank\[quant\]'"):
        adarank.runner.cli.preflight(cfg)


@needs_torchao
def test_the_runner_trains_adalora_over_an_nf4_base_and_exports_it(tmp_path):
    # adalora covers LoRA's path (the adapters over NF4 linears) and adds masking, the shrink and the export
    res = run(_nf4_config(tmp_path, "method=adalora", "method.r=2", "method.delta_t=2"), tmp_path / "run")
    assert res["steps"] == 8 and res["config"]["model"]["quantization"] == "nf4"
    assert 1 < res["value"] < float("inf")
    ranks = res["final_ranks"]
    assert sum(ranks.values()) == 2 * len(ranks)
    exported = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert sorted(exported["rank_pattern"].values()) == sorted(r for r in ranks.values() if r > 0)
