"""adarank.runner.methods: what each method trains, where targets come from, and the allocator's phases."""

from __future__ import annotations

import pytest
import torch

import adarank
from adarank.runner.config import MethodConfig, ModelConfig
from adarank.layers import LoraLinear, SVDLinear
from adarank.runner.methods import apply_method, build_allocator, method_budget
from adarank.runner.peft_baselines import PeftAllocator

from conftest import make_batch, tiny_bert

# tiny_bert: hidden 16, FFN 32, 2 layers, 2 labels. Adapting query and value: 4 matrices of 16x16.
MODEL = ModelConfig(name="tiny", name_or_path="random", targets=["query", "value"], train_modules=["classifier"])
N, D = 4, 16
HEAD = 16 * 2 + 2  # the classifier, trained in full


def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "name,per_matrix",
    [
        ("lora", 2 * (D + D)),  # r(d + k)
        ("rslora", 2 * (D + D)),
        ("peft_lora", 2 * (D + D)),
        ("adalora", 3 * (D + D + 1)),  # r_init(d + k + 1), r_init = ceil(1.5 x 2) = 3
        ("peft_adalora", 3 * (D + D + 1)),
    ],
)
def test_trainable_parameters_of_each_method(name, per_matrix):
    model = tiny_bert()
    a = apply_method(model, MethodConfig(name=name, r=2, alpha=4.0), MODEL)
    assert a.method == name and a.report.trainable == _trainable(a.model) == N * per_matrix + HEAD
    assert a.targets == [f"bert.encoder.layer.{i}.attention.self.{s}" for i in range(2) for s in ("query", "value")]
    assert a.report.base == sum(p.numel() for p in tiny_bert().parameters())
    assert a.model(**make_batch()).logits.shape == (4, 2)  # still runs
    if name in ("adalora", "peft_adalora"):
        assert (a.init_rank, a.target_total) == (3, 2 * N)


def test_full_fine_tuning_trains_everything():
    model = tiny_bert()
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    a = apply_method(model, MethodConfig(name="full"), MODEL)
    assert a.report.trainable == a.report.base == sum(p.numel() for p in model.parameters())
    assert not adarank.adapters(model) and a.orth_grad is None


def test_lora_and_rslora_scales():
    lora = apply_method(tiny_bert(), MethodConfig(name="lora", r=4, alpha=8.0), MODEL).model
    rs = apply_method(tiny_bert(), MethodConfig(name="rslora", r=4, alpha=8.0), MODEL).model
    assert {m.scale for _, m in adarank.adapters(lora)} == {2.0}
    assert {m.scale for _, m in adarank.adapters(rs)} == {4.0}
    assert all(isinstance(m, LoraLinear) for _, m in adarank.adapters(rs))


def test_adalora_has_svd_adapters_and_an_orthogonal_regulariser():
    a = apply_method(tiny_bert(), MethodConfig(name="adalora", r=2, orth_weight=0.5), MODEL)
    layers = adarank.svd_adapters(a.model)
    assert len(layers) == N and all(isinstance(m, SVDLinear) and m.r == 3 for _, m in layers)
    reg = a.orth_grad()  # adds 0.5·∇R to the P and Q gradients and returns R
    assert reg.ndim == 0 and reg.item() > 0 and not reg.requires_grad
    svd = [m for _, m in layers]
    want = 0.5 * adarank.orth_penalty(svd)
    assert reg.item() == pytest.approx(want.item() / 0.5, rel=1e-5)
    assert all(m.P.grad is not None and m.Q.grad is not None for m in svd)  # exact values: tests/test_orth.py
    assert apply_method(tiny_bert(), MethodConfig(name="adalora", orth_weight=0.0), MODEL).orth_grad is None


@pytest.mark.parametrize(
    "method_targets,regex,expected",
    [
        (None, None, ["attention.self.query", "attention.self.value"]),  # model.targets
        (["key"], None, ["attention.self.key"]),  # method.targets replace model.targets
        (["intermediate.dense"], None, ["intermediate.dense"]),
        (["key"], r".*\.value", ["attention.self.key", "attention.self.value"]),  # a regex adds to them
    ],
)
def test_targets_come_from_the_model_unless_the_method_names_them(method_targets, regex, expected):
    a = apply_method(tiny_bert(), MethodConfig(name="lora", r=2, targets=method_targets, target_regex=regex), MODEL)
    assert a.targets == [f"bert.encoder.layer.{i}.{s}" for i in range(2) for s in expected]
    assert sorted(n for n, _ in adarank.adapters(a.model)) == sorted(a.targets)


def test_unknown_target_lists_the_layers():
    with pytest.raises(ValueError, match=r"method.targets: 'nope' matches no linear layer; .*attention.self.query"):
        apply_method(tiny_bert(), MethodConfig(name="adalora", targets=["nope"]), MODEL)


@pytest.mark.parametrize(
    "kw,init_rank,target_total",
    [
        ({"r": 2}, 3, 8),
        ({"r": 2, "init_rank": 5}, 5, 8),
        ({"r": 2, "init_ratio": 2.0}, 4, 8),
        ({"target_total_rank": 6}, 3, 6),  # ceil(1.5 x 6 / 4) = 3
        ({"target_params": 10 * 33}, 4, 10),  # one triplet of a 16x16 matrix costs 16 + 16 + 1
    ],
)
def test_budget_from_rank_total_or_parameters(kw, init_rank, target_total):
    model = tiny_bert()
    names = adarank.find_targets(model, MODEL.targets)
    b = method_budget(model, MethodConfig(name="adalora", **kw), names)
    assert (b.init_rank, b.init_total, b.target_total) == (init_rank, init_rank * N, target_total)


@pytest.mark.parametrize("T,init_frac,final_frac,delta_t", [(100, 0.1, 0.2, 10), (37, 0.25, 0.3, 3), (10, 0.0, 0.0, 1)])
def test_allocator_phases_are_fractions_of_total_steps(T, init_frac, final_frac, delta_t):
    m = MethodConfig(name="adalora", r=2, init_frac=init_frac, final_frac=final_frac, delta_t=delta_t, beta1=0.7, score="sensitivity")
    a = apply_method(tiny_bert(), m, MODEL)
    alloc = build_allocator(a, m, T)
    assert isinstance(alloc, adarank.RankAllocator)
    sch = alloc.schedule
    assert (sch.total, sch.t_init, sch.t_final, sch.delta_t) == (T, round(init_frac * T), round(final_frac * T), delta_t)
    assert (alloc.init_total, alloc.target_total, alloc.beta1, alloc.score) == (3 * N, 2 * N, 0.7, "sensitivity")
    assert alloc.names == a.targets


def test_peft_allocator_gets_the_same_schedule():
    m = MethodConfig(name="peft_adalora", r=2, init_frac=0.1, final_frac=0.2, delta_t=5)
    a = apply_method(tiny_bert(), m, MODEL)
    alloc = build_allocator(a, m, 50)
    assert isinstance(alloc, PeftAllocator)
    cfg = a.model.peft_config["default"]
    assert (cfg.total_step, cfg.tinit, cfg.tfinal, cfg.deltaT) == (50, 5, 10, 5)
    assert alloc.names == a.targets
    # one optimizer step, as in the loop: PEFT's λ (lora_E) starts at 0 and its importance reads the gradients
    a.model(**make_batch()).loss.backward()
    torch.optim.SGD([p for p in a.model.parameters() if p.requires_grad], lr=0.1).step()
    res = alloc.step()  # the initial phase keeps all 12 triplets; ranks count the nonzero λ
    assert res.budget == 3 * N and res.phase == "init" and res.ranks.tolist() == [3] * N


@pytest.mark.parametrize("name", ["full", "lora", "rslora", "peft_lora"])
def test_fixed_rank_methods_have_no_allocator(name):
    m = MethodConfig(name=name, r=2)
    assert build_allocator(apply_method(tiny_bert(), m, MODEL), m, 100) is None


def test_too_short_a_run_for_the_schedule_is_an_error():
    m = MethodConfig(name="adalora", r=2)
    a = apply_method(tiny_bert(), m, MODEL)
    with pytest.raises(ValueError, match="method.final_frac"):  # the final allocation would precede any importance
        build_allocator(a, m, 1)


@pytest.mark.parametrize("weight", [0.0, 0.1, 0.5])
def test_peft_adalora_trains_with_its_orthogonal_regulariser(weight):
    # PEFT adds weight · mean_i ‖cov_i − I‖_F to the loss in AdaLoraModel.forward, which a plain PeftModel
    # (no task type) never calls: peft_adalora once trained with the regulariser silently off
    a = apply_method(tiny_bert(), MethodConfig(name="peft_adalora", r=2, alpha=4.0, orth_weight=weight), MODEL)
    batch = make_batch()
    with torch.no_grad():
        loss = a.model(**batch).loss
        plain = a.model.get_base_model()(**batch).loss  # the task loss alone
        covs = []
        for n, p in a.model.named_parameters():
            if "lora_A.default" in n:
                covs.append(p @ p.T)
            elif "lora_B.default" in n:
                covs.append(p.T @ p)
        reg = sum(torch.linalg.matrix_norm(c - torch.eye(c.shape[0])) for c in covs) / len(covs)
    assert len(covs) == 2 * N and reg > 0
    assert loss.item() == pytest.approx(plain.item() + weight * reg.item(), rel=1e-6)


def test_peft_methods_need_a_known_head():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.query = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="method.name: the PEFT methods need"):
        apply_method(Bare(), MethodConfig(name="peft_lora", r=2), ModelConfig(name="x", name_or_path="random", targets=["query"], train_modules=[]))


def test_the_saved_adapter_names_its_base_model_and_task_so_peft_loads_it_alone(tmp_path):
    """adapter/adapter_config.json carries base_model_name_or_path and task_type: AutoPeftModel needs no more."""
    import json

    from peft import AutoPeftModelForSequenceClassification

    base_dir = tmp_path / "base"
    tiny_bert().save_pretrained(base_dir)
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(base_dir).eval()
    model_cfg = ModelConfig(name="x", name_or_path=str(base_dir), targets=["query", "value"], train_modules=["classifier"])
    a = apply_method(model, MethodConfig(name="lora", r=2, alpha=4.0), model_cfg)
    with torch.no_grad():
        for _, layer in adarank.adapters(a.model):
            layer.lora_B.normal_()
    a.save(str(tmp_path / "run"))
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir) and cfg["task_type"] == "SEQ_CLS"
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "run" / "adapter")).eval()
    batch = make_batch()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, a.model(**batch).logits, atol=1e-5)


def test_a_random_model_has_no_base_to_name(tmp_path):
    import json

    apply_method(tiny_bert(), MethodConfig(name="lora", r=2), MODEL).save(str(tmp_path))
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] is None and cfg["task_type"] == "SEQ_CLS"
