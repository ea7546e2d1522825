"""method=eva end to end: a command-line run on the tiny GLUE files trains, exports an adapter PEFT loads and
that computes what the trained model does; a killed run resumes from its checkpoint's rank pattern without
running the SVD again, and ends as the uninterrupted run does."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import adarank.runner.eva_init
from adarank.inject import adapters
from adarank.runner import checkpoint as ckpt
from adarank.runner import cli

from . import GLUE_FIXTURES, TINY, capture_models, differing_tensors, one_thread, run, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
#: SST-2's fixture files: 5 rows, half of them train (one batch, so every step is an epoch and evaluates)
GLUE = ["task=sst2", f"data.dir={GLUE_FIXTURES}", "data.val_fraction=0.5"]


def _unadapted(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the trained model with every adapter replaced by its frozen base and the head re-drawn: the
    base the exported adapter goes onto (PEFT must bring the head back from modules_to_save)."""
    base = copy.deepcopy(model)
    for name, layer in adapters(base):
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, layer.base)
    torch.manual_seed(1)
    base.classifier.reset_parameters()
    return base.eval()


def test_eva_from_the_command_line_trains_and_exports_what_peft_loads(tmp_path, monkeypatch):
    from peft import PeftModel

    models = capture_models(monkeypatch)
    out = tmp_path / "run"
    cli.main([*TINY, *GLUE, "method=eva",
              "method.eva.rho=4", "train.max_steps=6", f"hydra.run.dir={out}", f"data.cache_dir={tmp_path / 'cache'}"])
    res = json.loads((out / "results.json").read_text())
    ranks = res["final_ranks"]
    assert res["method"] == "eva" and res["steps"] == 6 and len(ranks) == 12 and sum(ranks.values()) == 24
    assert res["budget_curve"][-1] == [6, 24] and (out / "rank_heatmap.png").exists()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert {k.replace("\\.", "."): v for k, v in cfg["rank_pattern"].items()} == {n: r for n, r in ranks.items() if r}

    (trained,) = models
    trained.eval()
    loaded = PeftModel.from_pretrained(_unadapted(trained), str(out / "adapter")).eval()
    ids = torch.randint(5, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = trained(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert any(layer.lora_B.abs().sum() > 0 for _, layer in adapters(trained))  # B trained away from 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_killed_eva_run_resumes_without_the_svd_and_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    overrides = [*GLUE, "method=eva", "method.r=1", "method.eva.rho=6", "train.max_steps=10",
                 "train.checkpoint_every=4", "train.log_every=3"]
    models = capture_models(monkeypatch)
    want = run(tiny_config(tmp_path, *overrides), tmp_path / "straight")
    (straight,) = models
    assert len(set(want["final_ranks"].values())) > 1  # a pattern, not r everywhere

    out = tmp_path / "killed"
    capture_models(monkeypatch, kill_at=7)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tmp_path, *overrides), out)
    assert ckpt.load(str(out))["allocator"]["ranks"] == want["final_ranks"]

    models = capture_models(monkeypatch)
    monkeypatch.setattr(adarank.runner.eva_init, "eva", lambda *a, **k: pytest.fail("the SVD ran again on resume"))
    got = run(tiny_config(tmp_path, *overrides, "resume=true"), out)
    (resumed,) = models
    for key in ("value", "metrics", "final_ranks", "budget_curve", "steps", "trainable_params", "evals", "train_log"):
        assert got[key] == want[key], key
    assert differing_tensors(ckpt.trainable_state(straight), ckpt.trainable_state(resumed)) == []
