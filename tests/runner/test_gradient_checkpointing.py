"""adarank.runner.gradient_checkpointing: the switch on a transformers model, and its refusals before any weights load."""

from __future__ import annotations

import pytest
import torch

import adarank
import adarank.runner.cli
import adarank.runner.models
import adarank.runner.train
from adarank.runner.gradient_checkpointing import check_supported, enable_gradient_checkpointing
from conftest import BERT_TARGETS, make_batch, randomize_lams, tiny_bert
from e2e import TINY, tiny_config


def _svd_bert(ckpt: bool):
    model = tiny_bert()
    if ckpt:
        enable_gradient_checkpointing(model)
    torch.manual_seed(100)
    adarank.inject(model, "svd", r=3, alpha=3.0, targets=BERT_TARGETS, train_modules=["classifier"])
    randomize_lams(model)
    return model.train()


def test_the_adapters_get_the_same_gradients_with_no_input_requiring_grad():
    """Non-reentrant checkpointing reaches the adapters of the first block although the embedding output does
    not require grad (transformers' input hook, the reentrant workaround, is removed); every gradient is
    the same bits as without checkpointing, and the blocks really are recomputed."""
    grads, calls = [], []
    for ckpt in (False, True):
        model = _svd_bert(ckpt)
        seen = {"emb_grad": None, "calls": 0}
        model.bert.embeddings.register_forward_hook(lambda m, a, out: seen.update(emb_grad=out.requires_grad))
        first = model.bert.encoder.layer[0].attention.self.query
        first.register_forward_pre_hook(lambda m, a: seen.update(calls=seen["calls"] + 1))
        model(**make_batch()).loss.backward()
        assert seen["emb_grad"] is False
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        calls.append(seen["calls"])
        assert all(b.gradient_checkpointing is ckpt for b in model.bert.encoder.layer)
    assert calls == [1, 2]  # the forward, then the recomputation in backward
    plain, ckpt = grads
    assert plain.keys() == ckpt.keys() and len(plain) == 3 * 11 + 2  # P, λ, Q of 2 x 5 adapters and the pooler's; the classifier
    assert all(ckpt[n] is not None and torch.equal(plain[n], ckpt[n]) for n in plain)


def test_an_architecture_transformers_cannot_checkpoint_is_refused_by_name():
    from transformers import MPNetConfig, MPNetForSequenceClassification

    with torch.device("meta"):
        mpnet = MPNetForSequenceClassification(MPNetConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                           intermediate_size=32))
    with pytest.raises(ValueError, match=r"^train\.gradient_checkpointing: MPNetForSequenceClassification does not "):
        check_supported(mpnet)
    with pytest.raises(ValueError, match=r"^train\.gradient_checkpointing: "):
        enable_gradient_checkpointing(mpnet)
    check_supported(tiny_bert())


@pytest.fixture
def mpnet_folder(tmp_path):
    """A folder with an MPNet config.json and no weights (the preflight reads only the config)."""
    from transformers import MPNetConfig

    MPNetConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path / "mpnet")
    return tmp_path / "mpnet"


def test_the_preflight_refuses_it_for_mpnet_before_any_weights_load(tmp_path, mpnet_folder, monkeypatch, capsys):
    monkeypatch.setattr(adarank.runner.train, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    model = [f"model.name_or_path={mpnet_folder}", "model.tokenizer=minilm", "model.targets=[attn.q,attn.k,attn.v]",
             "model.train_modules=[classifier]"]
    cfg = tiny_config(tmp_path, *model, "train.gradient_checkpointing=true")
    with pytest.raises(ValueError, match=r"^train\.gradient_checkpointing: MPNetForSequenceClassification does not"):
        adarank.runner.cli.preflight(cfg)
    adarank.runner.cli.preflight(tiny_config(tmp_path, *model))  # the same model without it passes
    # the command line: one line naming the field, exit code 2, nothing run
    with pytest.raises(SystemExit) as info:
        adarank.runner.cli.main([*TINY, f"data.cache_dir={tmp_path / 'cache'}", *model, "train.gradient_checkpointing=true",
                                 f"hydra.run.dir={tmp_path / 'run'}"])
    assert info.value.code == adarank.runner.cli.EXIT_USAGE
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("adarank: error: train.gradient_checkpointing: MPNet"), lines
    assert not (tmp_path / "run").exists()


def test_it_is_not_part_of_what_a_run_computes():
    """Resuming may switch it (a run that ran out of memory continues with it), and the report groups runs
    with and without it together."""
    from adarank.runner.resume import config_differences
    from adarank.studies.runs import NOT_COMPUTATION

    saved = {"train": {"gradient_checkpointing": False, "lr": 1e-3}}
    assert config_differences(saved, {"train": {"gradient_checkpointing": True, "lr": 1e-3}}) == []
    assert config_differences(saved, {"train": {"gradient_checkpointing": True, "lr": 2e-3}}) == [("train.lr", 1e-3, 2e-3)]
    assert "train.gradient_checkpointing" in NOT_COMPUTATION
