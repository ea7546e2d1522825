"""The README's "Adding an allocation method" example, run as written: its Python registers a method, its YAML
goes into a config folder of its own, and `python -m adarank.run method=top_lambda` trains with it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from adarank.runner import cli
from adarank.runner.methods import METHODS

README = Path(__file__).resolve().parents[2] / "README.md"
TINY = ["model=tiny_random", "train.max_steps=20", "train.batch_size=8", "data.max_train_samples=64",
        "data.max_eval_samples=32", "wandb.mode=disabled", "train.progress=false"]


def _section_blocks() -> dict[str, str]:
    text = README.read_text()
    section = text.split("## Adding an allocation method", 1)[1].split("\n## ", 1)[0]
    return {lang: body for lang, body in re.findall(r"```(python|yaml)\n(.*?)```", section, re.S)}


@pytest.fixture
def top_lambda(tmp_path):
    blocks = _section_blocks()
    namespace: dict = {}
    exec(compile(blocks["python"], str(README), "exec"), namespace)  # registers METHODS["top_lambda"]
    (tmp_path / "conf" / "method").mkdir(parents=True)
    (tmp_path / "conf" / "method" / "top_lambda.yaml").write_text(blocks["yaml"])
    yield namespace, tmp_path / "conf"
    METHODS.pop("top_lambda", None)


def test_the_readme_example_is_short():
    python = _section_blocks()["python"]
    cls = python.split("class TopLambda", 1)[1].split("\ndef ", 1)[0]
    assert len(cls.strip().splitlines()) <= 30  # the class; the builder entry is three lines more


def test_the_readme_allocator_trains_through_the_command_line(tmp_path, top_lambda):
    namespace, conf = top_lambda
    out = tmp_path / "run"
    cli.main([*TINY, "method=top_lambda", f"hydra.searchpath=[file://{conf}]", f"hydra.run.dir={out}",
              f"data.cache_dir={tmp_path / 'cache'}"])
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "top_lambda" and res["config"]["method"]["orth_weight"] == 0.1  # adalora's settings
    # the toy allocator ran every step: the budget fell from 36 (r_init 3 x 12 matrices) to 24 (r = 2)
    curve = res["budget_curve"]
    assert [s for s, _ in curve] == list(range(1, 21)) and curve[0][1] == 36 and curve[-1][1] == 24
    assert sum(res["final_ranks"].values()) == 24 and len(res["final_ranks"]) == 12
    # what it exported is what it kept: 24 nonzero λ in the saved adapter (PEFT LoRA format, rank pattern)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sum(cfg["rank_pattern"].values()) == 24


def test_a_method_without_its_yaml_is_a_one_line_error(capsys, top_lambda):
    with pytest.raises(SystemExit) as info:
        cli.main([*TINY, "method=top_lambda_typo"])
    assert info.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "top_lambda_typo" in err


def test_the_toy_allocator_keeps_the_largest_lambdas(top_lambda):
    import adarank
    from conftest import svd_bert

    namespace, _ = top_lambda
    model, _ = svd_bert()
    layers = adarank.svd_adapters(model)
    torch.manual_seed(0)
    for _, m in layers:
        m.lam.data.normal_()
    lam = torch.cat([m.lam.detach().clone() for _, m in layers])
    alloc = namespace["TopLambda"](layers, adarank.Schedule(total=4, t_init=0, t_final=1, delta_t=1), 10)
    a = alloc.step()
    kept = torch.cat([m.lam.detach() for _, m in layers]) != 0
    assert a.budget == int(kept.sum()) and torch.equal(kept, a.mask)
    assert lam.abs()[kept].min() > lam.abs()[~kept].max()  # the largest |λ| survive
    assert isinstance(alloc, adarank.Allocator)
