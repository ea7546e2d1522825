"""adarank.inject: target selection, freezing, parameter counts, error messages."""

from __future__ import annotations

import pytest
import torch

import adarank
from adarank.inject import adapters, find_targets, linear_names, param_report
from adarank.layers import LoraLinear, SVDLinear

from conftest import tiny_bert

L0 = "bert.encoder.layer.0."
L1 = "bert.encoder.layer.1."


@pytest.mark.parametrize(
    "targets,regex,expected",
    [
        (["query"], None, [L0 + "attention.self.query", L1 + "attention.self.query"]),
        # a suffix matches at a dot: "dense" hits every *.dense but not "classifier"
        (["output.dense"], None, [p + s for p in (L0, L1) for s in ("attention.output.dense", "output.dense")]),
        (["self.query", "value"], None, [p + "attention.self." + s for p in (L0, L1) for s in ("query", "value")]),
        (["bert.pooler.dense"], None, ["bert.pooler.dense"]),
        (None, r".*layer\.1\.attention\.self\.(query|key)", [L1 + "attention.self.query", L1 + "attention.self.key"]),
        # suffixes and a regex together: the union
        (["classifier"], r".*\.0\..*intermediate\.dense", [L0 + "intermediate.dense", "classifier"]),
    ],
)
def test_find_targets(bert, targets, regex, expected):
    got = find_targets(bert, targets, regex)
    assert got == [n for n in linear_names(bert) if n in expected]  # model order
    assert sorted(got) == sorted(expected)


def test_suffix_does_not_match_inside_a_name(bert):
    names = find_targets(bert, ["dense"])
    assert len(names) == 7 and all(n.split(".")[-1] == "dense" for n in names)
    with pytest.raises(ValueError, match="method.targets: 'uery' matches no linear layer"):
        find_targets(bert, ["uery"])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"targets": ["nope"]}, "method.targets"),
        ({"targets": ["query", "nope"]}, "method.targets"),  # every suffix must match
        ({"regex": r"query"}, "method.target_regex"),  # fullmatch, so no hit
        ({"regex": r".*\.nope"}, "method.target_regex"),
    ],
)
def test_no_match_names_the_field_and_lists_linear_layers(bert, kwargs, field):
    model = bert
    with pytest.raises(ValueError) as e:
        adarank.inject(model, "svd", r=2, alpha=2, **kwargs)
    msg = str(e.value)
    assert msg.startswith(field)
    # layer indices are collapsed, so the list stays one line
    for name in ("bert.encoder.layer.N.attention.self.query", "bert.encoder.layer.N.output.dense", "classifier"):
        assert name in msg
    assert not adapters(model) and all(p.requires_grad for p in model.parameters())  # nothing half-done


def test_invalid_regex_unknown_kind_and_no_targets_raise():
    with pytest.raises(ValueError, match=r"method.target_regex: invalid regex"):
        find_targets(tiny_bert(), regex="(unclosed")
    with pytest.raises(ValueError, match="method.kind: unknown adapter kind 'dora'"):
        adarank.inject(tiny_bert(), "dora", r=2, alpha=2, targets=["query"])
    with pytest.raises(ValueError, match="method.targets"):
        find_targets(tiny_bert())
    with pytest.raises(ValueError, match="model.train_modules: 'nope'"):
        adarank.inject(tiny_bert(), "svd", r=2, alpha=2, targets=["query"], train_modules=["nope"])


@pytest.mark.parametrize("kind,cls,extra", [("lora", LoraLinear, 0), ("svd", SVDLinear, 1)])
def test_freezing_and_param_report(bert, kind, cls, extra):
    model = bert
    base_total = sum(p.numel() for p in model.parameters())
    r = 3
    rep = adarank.inject(model, kind, r=r, alpha=6, targets=["query", "value", "dense"], train_modules=["classifier"])
    wrapped = adapters(model)
    assert len(wrapped) == 11 and all(isinstance(m, cls) for _, m in wrapped)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter_params = {f"{n}.{pn}" for n, m in wrapped for pn, _ in m.named_parameters() if not pn.startswith("base.")}
    assert trainable == adapter_params | {"classifier.weight", "classifier.bias"}
    expected = {n: r * (m.in_features + m.out_features + extra) for n, m in wrapped}
    expected["classifier"] = 16 * 2 + 2
    assert rep.per_module == expected
    assert rep.trainable == sum(expected.values())
    assert rep.base == base_total  # the adapters are not counted as base
    assert rep.share == pytest.approx(rep.trainable / base_total)
    assert rep == param_report(model)
    assert f"{rep.trainable:,}" in rep.summary() and f"{rep.base:,}" in rep.summary()


def test_params_by_shape_pinned():
    """Pinned numbers for the tiny BERT: 6 16×16 + 2 16→32 + 2 32→16 + pooler 16×16 at r = 4, SVD."""
    rep = adarank.inject(tiny_bert(), "svd", r=4, alpha=4, targets=["query", "value", "dense"])
    assert sorted(set(rep.per_module.values())) == [4 * 33, 4 * 49]
    assert rep.trainable == 7 * 4 * 33 + 4 * 4 * 49 == 1708
    assert rep.base == 6130


def test_injected_model_still_runs_and_only_adapters_get_grads(bert, batch):
    model = bert
    adarank.inject(model, "svd", r=2, alpha=2, regex=r".*attention\.self\.(query|value)")
    with torch.no_grad():
        for _, m in adarank.svd_adapters(model):
            m.lam.fill_(1.0)
    out = model(**batch)
    out.loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == {f"{n}.{pn}" for n, _ in adarank.svd_adapters(model) for pn in ("P", "lam", "Q")}


@pytest.mark.parametrize(
    "kwargs,train_modules,field,modules",
    [
        ({"targets": ["query", "classifier"]}, ["classifier"], "method.targets", "classifier"),
        # inside a fully trained module: the pooler trains in full, so its dense layer cannot be adapted
        ({"targets": ["dense"]}, ["classifier", "pooler"], "method.targets", "bert.pooler.dense"),
        ({"targets": ["query"], "regex": r"classifier|bert\.pooler\.dense"}, ["classifier", "pooler"],
         "method.target_regex", "bert.pooler.dense, classifier"),
    ],
)
def test_adapting_a_module_that_trains_in_full_is_refused(bert, kwargs, train_modules, field, modules):
    model = bert
    with pytest.raises(ValueError) as e:
        adarank.inject(model, "lora", r=2, alpha=2, train_modules=train_modules, **kwargs)
    msg = str(e.value)
    assert msg.startswith(f"{field}: {modules} ") and "\n" not in msg
    assert "model.train_modules (" in msg
    assert not adapters(model) and all(p.requires_grad for p in model.parameters())  # nothing half-done


def test_runner_refuses_adapting_the_head_it_trains_in_full():
    from adarank.runner.config import MethodConfig, ModelConfig
    from adarank.runner.methods import apply_method

    model_cfg = ModelConfig(name="x", name_or_path="random", targets=["query"], train_modules=["classifier"])
    for name in ("lora", "adalora"):
        with pytest.raises(ValueError, match=r"^method\.targets: classifier is also trained in full by "
                                             r"model\.train_modules \(classifier\)"):
            apply_method(tiny_bert(), MethodConfig(name=name, r=2, targets=["classifier"]), model_cfg)
    # the head adapted without training it in full is fine
    apply_method(tiny_bert(), MethodConfig(name="lora", r=2, targets=["classifier"]),
                 ModelConfig(name="x", name_or_path="random", targets=["query"], train_modules=[]))
