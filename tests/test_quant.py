"""model.quantization=nf4 (adarank/quant.py): adapters over torchao NF4 bases on the tiny Llama, on the CPU."""

from __future__ import annotations

import pytest
import torch

import adarank
from adarank.export import export_peft
from adarank.quant import is_quantized, nbytes, quantize_nf4_
from adarank.shrink import shrink_layers

from conftest import tiny_llama

pytest.importorskip("torchao", reason="model.quantization=nf4 needs torchao (pip install 'adarank[quant]')")

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))


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
