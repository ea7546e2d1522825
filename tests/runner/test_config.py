"""adarank.runner.config: every check names its field, every field is documented, every YAML fits the schema."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

import adarank.runner.config as C
import adarank.runner.cli

from e2e import compose_config

# (dataclass, one bad value, the field its error must name)
BAD_FIELDS = [
    (C.ModelConfig, {"dtype": "int8"}, "model.dtype"),
    (C.ModelConfig, {"name_or_path": ""}, "model.name_or_path"),
    (C.TaskConfig, {"name": "imdb"}, "task.name"),
    (C.TaskConfig, {"max_length": 4}, "task.max_length"),
    (C.DataConfig, {"val_fraction": 0.0}, "data.val_fraction"),
    (C.DataConfig, {"val_fraction": 1.0}, "data.val_fraction"),
    (C.DataConfig, {"max_train_samples": 0}, "data.max_train_samples"),
    (C.DataConfig, {"max_eval_samples": -1}, "data.max_eval_samples"),
    (C.MethodConfig, {"name": "dora"}, "method.name"),
    (C.MethodConfig, {"r": 0}, "method.r"),
    (C.MethodConfig, {"alpha": 0.0}, "method.alpha"),
    (C.MethodConfig, {"dropout": 1.0}, "method.dropout"),
    (C.MethodConfig, {"adapter_dtype": "int8"}, "method.adapter_dtype"),
    (C.MethodConfig, {"lr": 0.0}, "method.lr"),
    (C.MethodConfig, {"init_rank": 0}, "method.init_rank"),
    (C.MethodConfig, {"init_ratio": 0.5}, "method.init_ratio"),
    (C.MethodConfig, {"init_frac": 1.0}, "method.init_frac"),
    (C.MethodConfig, {"final_frac": -0.1}, "method.final_frac"),
    (C.MethodConfig, {"init_frac": 0.6, "final_frac": 0.5}, "method.init_frac"),
    (C.MethodConfig, {"delta_t": 0}, "method.delta_t"),
    (C.MethodConfig, {"beta1": 1.0}, "method.beta1"),
    (C.MethodConfig, {"beta2": -0.1}, "method.beta2"),
    (C.MethodConfig, {"score": "fisher"}, "method.score"),
    (C.MethodConfig, {"orth_weight": -1.0}, "method.orth_weight"),
    (C.MethodConfig, {"orth_form": "frobenius"}, "method.orth_form"),
    (C.MethodConfig, {"r": 4, "init_rank": 2}, "method.r"),
    (C.TrainConfig, {"epochs": 0.0}, "train.epochs"),
    (C.TrainConfig, {"max_steps": 0}, "train.max_steps"),
    (C.TrainConfig, {"batch_size": 0}, "train.batch_size"),
    (C.TrainConfig, {"grad_accum": 0}, "train.grad_accum"),
    (C.TrainConfig, {"lr": -1.0}, "train.lr"),
    (C.TrainConfig, {"weight_decay": -0.1}, "train.weight_decay"),
    (C.TrainConfig, {"warmup_frac": 1.0}, "train.warmup_frac"),
    (C.TrainConfig, {"max_grad_norm": -1.0}, "train.max_grad_norm"),
    (C.TrainConfig, {"precision": "fp8"}, "train.precision"),
    (C.TrainConfig, {"eval_every": -1}, "train.eval_every"),
    (C.TrainConfig, {"checkpoint_every": -1}, "train.checkpoint_every"),
    (C.TrainConfig, {"log_every": 0}, "train.log_every"),
    (C.TrainConfig, {"eval_batch_size": 0}, "train.eval_batch_size"),
    (C.TrainConfig, {"device": "tpu"}, "train.device"),
    (C.TrainConfig, {"cuda_graph": True, "compile": True}, "train.cuda_graph"),
    (C.TrainConfig, {"cuda_graph": True, "precision": "fp16"}, "train.cuda_graph"),
    (C.TrainConfig, {"cuda_graph_shapes": 0}, "train.cuda_graph_shapes"),
    (C.WandbConfig, {"mode": "maybe"}, "wandb.mode"),
    # found by tests/runner/test_fuzz.py
    (C.Config, {"seed": -1}, "seed"),
    (C.Config, {"seed": 2**32}, "seed"),
    (C.Config, {"experiment_name": ""}, "experiment_name"),
    (C.Config, {"model": C.ModelConfig(targets=[])}, "model.targets"),
    (C.ModelConfig, {"name": ""}, "model.name"),
    (C.ModelConfig, {"tokenizer": ""}, "model.tokenizer"),
    (C.DataConfig, {"dir": ""}, "data.dir"),
    (C.DataConfig, {"cache_dir": ""}, "data.cache_dir"),
    (C.DataConfig, {"val_fraction": float("nan")}, "data.val_fraction"),
    (C.MethodConfig, {"target_params": 0}, "method.target_params"),
    (C.MethodConfig, {"target_total_rank": -1}, "method.target_total_rank"),
    (C.MethodConfig, {"name": "lora", "target_params": 1000}, "method.target_params"),
    (C.MethodConfig, {"name": "full", "target_total_rank": 10}, "method.target_total_rank"),
    (C.MethodConfig, {"init_ratio": float("inf")}, "method.init_ratio"),
    (C.MethodConfig, {"orth_weight": float("inf")}, "method.orth_weight"),
    (C.MethodConfig, {"target_regex": ""}, "method.target_regex"),
    (C.TrainConfig, {"lr": float("inf")}, "train.lr"),
    (C.TrainConfig, {"max_grad_norm": float("nan")}, "train.max_grad_norm"),
    (C.WandbConfig, {"project": ""}, "wandb.project"),
]


@pytest.mark.parametrize("cls,kw,field", BAD_FIELDS, ids=[f"{f}={list(kw.values())}" for _, kw, f in BAD_FIELDS])
def test_each_check_names_its_field(cls, kw, field):
    with pytest.raises(ValueError) as info:
        cls(**kw)
    assert str(info.value).startswith(f"{field}: ")


def test_defaults_are_valid_and_relaxed_where_they_should_be():
    C.Config()
    C.MethodConfig(name="full", r=0)  # full fine-tuning has no rank
    C.MethodConfig(r=16, init_rank=4, target_total_rank=10)  # an explicit budget replaces method.r
    C.TrainConfig(device="cuda:1")
    C.Config(seed=2**32 - 1)
    C.MethodConfig(name="peft_adalora", target_params=1000)  # both adaptive methods take an explicit budget
    C.MethodConfig(name="lora", init_rank=8, init_ratio=2.0)  # ignored, so a sweep over methods may set them
    C.Config(model=C.ModelConfig(targets=[]), method=C.MethodConfig(targets=["query"]))  # method.targets wins
    C.Config(model=C.ModelConfig(targets=[]), method=C.MethodConfig(target_regex=".*query"))


def test_every_field_has_a_docstring():
    tree = ast.parse(inspect.getsource(C))
    documented: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            body = node.body
            documented[node.name] = {
                a.target.id for a, b in zip(body, body[1:])
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
            }
    for cls in (C.ModelConfig, C.TaskConfig, C.DataConfig, C.MethodConfig, C.TrainConfig, C.WandbConfig):
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields <= documented[cls.__name__], f"{cls.__name__}: undocumented {sorted(fields - documented[cls.__name__])}"
    top = {f.name for f in dataclasses.fields(C.Config)} - {"model", "task", "method", "data", "train", "wandb"}
    assert top <= documented["Config"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in Path(adarank.runner.cli.CONF_DIR, group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in ("model", "task", "method") for o in _options(g)])
def test_every_group_option_fits_the_schema(group, option):
    node = getattr(adarank.runner.cli.to_config(compose_config([f"{group}={option}"])), group)
    assert node.name == option
    if group == "model":  # a causal LM has no task head to train in full
        assert node.targets and (node.train_modules or option in ("smollm2", "tiny_llama"))
    if group == "method":
        assert node.adaptive == (option in ("adalora", "increlora", "peft_adalora", "sora", "sora_fixed"))


def test_a_typo_in_a_key_fails_at_composition():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="method.rr"):
        compose_config(["method.rr=3"])


@pytest.mark.parametrize("method,r,ratio", [("lora", 16, 0.5), ("adalora", 4, 4.0), ("rslora", 8, 2.0)])
def test_alpha_ratio_sets_alpha_to_ratio_times_r(method, r, ratio):
    m = C.MethodConfig(name=method, r=r, alpha=123.0, alpha_ratio=ratio)
    assert m.alpha == ratio * r
    assert C.MethodConfig(name=method, r=r, alpha=123.0).alpha == 123.0  # unset: alpha as given
