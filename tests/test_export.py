"""adarank.export: the written PEFT LoRA adapter, loaded by PEFT itself, reproduces our logits."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import PeftModel

import adarank

from conftest import BERT_TARGETS, GPT2_TARGETS, LLAMA_TARGETS, drive, make_batch, randomize_lams, tiny_bert, tiny_llama

TOL = 1e-5  # max abs logit difference in fp32: the scale is folded into B, so only rounding differs


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def export_and_load(model, base, tmp_path, **kw):
    ranks = adarank.export_peft(model, str(tmp_path), **kw)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    return ranks, cfg, loaded


def assert_reproduces(model, loaded, base, batch):
    ours = logits(model, batch)
    assert (ours - logits(base, batch)).abs().max() > 100 * TOL  # the adapters matter
    assert (logits(loaded, batch) - ours).abs().max().item() <= TOL


@pytest.mark.parametrize("rslora", [False, True])
def test_svd_with_pruned_modules(tmp_path, rslora):
    base = tiny_bert()
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    adarank.inject(model, "svd", r=4, alpha=8.0, targets=BERT_TARGETS, rslora=rslora)
    randomize_lams(model, std=3.0)
    layers = dict(adarank.svd_adapters(model))
    names = list(layers)
    with torch.no_grad():
        layers[names[0]].lam.zero_()  # pruned to rank 0
        layers[names[4]].lam.zero_()
        layers[names[7]].lam[[0, 2]] = 0.0  # partly pruned: rank 2
    ranks, cfg, loaded = export_and_load(model, base, tmp_path)
    expected = {n: 4 for n in names} | {names[0]: 0, names[4]: 0, names[7]: 2}
    assert ranks == expected
    kept = sorted(n for n, r in expected.items() if r > 0)
    assert cfg["target_modules"] == kept and names[0] not in cfg["target_modules"]
    esc = {n.replace(".", "\\."): r for n, r in expected.items() if r > 0}
    assert cfg["rank_pattern"] == esc and cfg["alpha_pattern"] == esc  # α = r: PEFT scale 1
    assert cfg["peft_type"] == "LORA" and cfg["use_rslora"] is False and cfg["fan_in_fan_out"] is False
    # PEFT built exactly the exported ranks
    for n in kept:
        lora_A = loaded.base_model.model.get_submodule(n).lora_A["default"].weight
        assert lora_A.shape == (expected[n], layers[n].in_features)
    assert_reproduces(model, loaded, base, make_batch())


def test_svd_after_allocation_and_shrink(tmp_path):
    base = tiny_bert()
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    adarank.inject(model, "svd", r=4, alpha=8.0, targets=BERT_TARGETS)
    randomize_lams(model, std=3.0)
    layers = adarank.svd_adapters(model)
    alloc = adarank.RankAllocator(layers, adarank.Schedule(total=3, t_init=0, t_final=1, delta_t=1), 15)
    for t in (1, 2):
        drive(layers, t)
        alloc.step()
    alloc.shrink()
    ranks, cfg, loaded = export_and_load(model, base, tmp_path)
    assert ranks == dict(zip(alloc.names, alloc.ranks().tolist())) and sum(ranks.values()) == 15
    assert_reproduces(model, loaded, base, make_batch())


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_with_classifier_in_modules_to_save(tmp_path, rslora):
    base = tiny_bert()
    model = copy.deepcopy(base)
    torch.manual_seed(2)
    adarank.inject(
        model, "lora", r=3, alpha=6.0, targets=["query", "value"], rslora=rslora, train_modules=["classifier"]
    )
    with torch.no_grad():
        for _, m in adarank.adapters(model):
            m.lora_B.normal_(std=0.5)
            assert m.scale == (6.0 / math.sqrt(3) if rslora else 2.0)
        model.classifier.weight.normal_()  # the trained head differs from the base's
        model.classifier.bias.normal_()
    ranks, cfg, loaded = export_and_load(model, base, tmp_path, modules_to_save=["classifier"])
    assert set(ranks.values()) == {3} and len(ranks) == 4
    assert cfg["modules_to_save"] == ["classifier"]
    assert set(cfg["rank_pattern"].values()) == {3} and cfg["use_rslora"] is False
    batch = make_batch()
    assert_reproduces(model, loaded, base, batch)
    # without the head the logits are wrong: the test sees the classifier
    plain = tmp_path / "no_head"
    adarank.export_peft(model, str(plain))
    headless = PeftModel.from_pretrained(copy.deepcopy(base), str(plain)).eval()
    assert (logits(headless, batch) - logits(model, batch)).abs().max() > 0.1


def test_gpt2_conv1d(tmp_path, gpt2):
    base = gpt2
    model = copy.deepcopy(base)
    torch.manual_seed(3)
    adarank.inject(model, "svd", r=4, alpha=8.0, targets=GPT2_TARGETS)
    randomize_lams(model, std=3.0)
    names = [n for n, _ in adarank.svd_adapters(model)]
    assert len(names) == 6  # attn.c_attn, attn.c_proj, mlp.c_proj per layer
    with torch.no_grad():
        dict(adarank.svd_adapters(model))[names[1]].lam.zero_()
    ranks, cfg, loaded = export_and_load(model, base, tmp_path)
    assert cfg["fan_in_fan_out"] is True and names[1] not in cfg["target_modules"] and ranks[names[1]] == 0
    assert_reproduces(model, loaded, base, make_batch())


def test_export_rejects_other_modules():
    with pytest.raises(TypeError, match="not an adarank adapter"):
        adarank.export.peft_factors(torch.nn.Linear(2, 2))


def test_export_of_untrained_svd_model_is_loadable_or_refused(tmp_path):
    base = tiny_bert()
    model = copy.deepcopy(base)
    adarank.inject(model, "svd", r=4, alpha=8.0, targets=BERT_TARGETS)
    try:
        adarank.export_peft(model, str(tmp_path))
    except ValueError:
        return  # a clear refusal is fine too
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    batch = make_batch()
    torch.testing.assert_close(logits(loaded, batch), logits(base, batch), rtol=0, atol=TOL)


def test_modules_to_save_that_matches_nothing_raises(tmp_path):
    model = tiny_bert()
    adarank.inject(model, "lora", r=2, alpha=2.0, targets=["query"], train_modules=["classifier"])
    with pytest.raises(ValueError, match="modules_to_save"):
        adarank.export_peft(model, str(tmp_path), modules_to_save=["clasifier"])


def _saved(model, folder):
    model.save_pretrained(str(folder))
    return str(folder)


def test_auto_peft_model_loads_a_sequence_classifier_without_naming_the_base(tmp_path):
    from peft import AutoPeftModelForSequenceClassification

    base = tiny_bert()
    base_dir = _saved(base, tmp_path / "base")
    model = copy.deepcopy(base)
    torch.manual_seed(4)
    adarank.inject(model, "svd", r=4, alpha=8.0, targets=BERT_TARGETS, train_modules=["classifier"])
    randomize_lams(model, std=3.0)
    with torch.no_grad():
        model.classifier.weight.normal_()  # the trained head differs from the saved base's
    out = tmp_path / "adapter"
    adarank.export_peft(model, str(out), base_model_name_or_path=base_dir, task_type="SEQ_CLS",
                        modules_to_save=["classifier"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["base_model_name_or_path"], cfg["task_type"]) == (base_dir, "SEQ_CLS")
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert_reproduces(model, loaded, base, make_batch())


def test_auto_peft_model_loads_a_causal_lm_without_naming_the_base(tmp_path):
    from peft import AutoPeftModelForCausalLM

    base = tiny_llama()
    base_dir = _saved(base, tmp_path / "base")
    model = copy.deepcopy(base)
    torch.manual_seed(5)
    adarank.inject(model, "lora", r=2, alpha=4.0, targets=LLAMA_TARGETS)
    with torch.no_grad():
        for _, m in adarank.adapters(model):
            m.lora_B.normal_(std=0.5)
    out = tmp_path / "adapter"
    adarank.export_peft(model, str(out), base_model_name_or_path=base_dir, task_type="CAUSAL_LM")
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    assert_reproduces(model, loaded, base, make_batch())


def test_export_refuses_an_unknown_task_type(tmp_path):
    model = tiny_bert()
    adarank.inject(model, "lora", r=2, alpha=2.0, targets=["query"])
    with pytest.raises(ValueError, match="task_type"):
        adarank.export_peft(model, str(tmp_path), task_type="SEQUENCE_CLASSIFICATION")
    assert not (tmp_path / "adapter_config.json").exists()


def test_svd_after_increlora_growth(tmp_path):
    from adarank.increlora import IncreLoraAllocator

    base = tiny_bert()
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    adarank.inject(model, "svd", r=1, alpha=8.0, targets=BERT_TARGETS)
    layers = adarank.svd_adapters(model)
    alloc = IncreLoraAllocator(layers, adarank.Schedule(total=6, t_init=0, t_final=1, delta_t=1), 20, top_h=3)
    for t in range(1, 5):
        drive(layers, t)  # every λ, the new ones too, leaves 0
        alloc.step()
        alloc.maybe_shrink(None)
    grown = {n: m.r for n, m in layers}
    assert sum(grown.values()) == 20 and max(grown.values()) > 1
    ranks, cfg, loaded = export_and_load(model, base, tmp_path)
    assert ranks == grown and cfg["rank_pattern"] == {n.replace(".", r"\."): r for n, r in grown.items()}
    assert_reproduces(model, loaded, base, make_batch())
