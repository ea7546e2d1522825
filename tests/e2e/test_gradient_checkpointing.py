"""train.gradient_checkpointing=true through the runner: the same run, bit for bit, as without it.

On a CPU the recomputation in backward runs the same kernels on the same inputs, with the forward's RNG
state restored (the tiny BERT trains with dropout 0.1, so the masks must be redrawn identically), so every
gradient is the same bits: the allocator's importance of P, λ and Q, hence the masks and ranks, the losses
and the final weights are compared exactly, not within a tolerance. Each test also counts an adapter's
training calls to show that the blocks really were recomputed (twice the calls with checkpointing).
"""

from __future__ import annotations

import pytest
import torch

import adarank.runner.cli
import adarank.runner.train
from adarank.inject import svd_adapters
from adarank.layers import LoraLinear, SVDLinear

from . import GLUE_FIXTURES, TINY, compose_config, differing_tensors, one_thread, run, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
APPLY_METHOD = adarank.runner.train.apply_method


def _spy(monkeypatch) -> dict:
    """Count the training calls of the model's first adapter layer; keep the model train() builds."""
    seen: dict = {"calls": 0}
    real = APPLY_METHOD  # not the attribute: an earlier spy of the same test may sit there

    def spy(model, method, model_cfg):
        adapted = real(model, method, model_cfg)
        first = next(m for m in adapted.model.modules() if isinstance(m, (LoraLinear, SVDLinear)))

        def count(module, args):
            if module.training and torch.is_grad_enabled():
                seen["calls"] += 1

        first.register_forward_pre_hook(count)
        seen["model"] = adapted.model
        return adapted

    monkeypatch.setattr(adarank.runner.train, "apply_method", spy)
    return seen


def _both(tmp_path, monkeypatch, make_config, *overrides: str):
    """(results, spy) without and with checkpointing, same config otherwise."""
    out = []
    for ckpt in ("false", "true"):
        seen = _spy(monkeypatch)
        cfg = make_config(tmp_path, *overrides, "train.log_every=1", f"train.gradient_checkpointing={ckpt}")
        out.append((run(cfg, tmp_path / f"ckpt_{ckpt}"), seen))
    return out


def _assert_same_run(plain, ckpt) -> None:
    (a, sa), (b, sb) = plain, ckpt
    assert b["config"]["train"]["gradient_checkpointing"] is True
    assert sb["calls"] == 2 * sa["calls"] > 0  # every training forward of the block ran again in backward
    assert [e["train/loss"] for e in b["train_log"]] == [e["train/loss"] for e in a["train_log"]]
    assert b["budget_curve"] == a["budget_curve"] and b["final_ranks"] == a["final_ranks"]
    assert b["metrics"]["final"] == a["metrics"]["final"]
    weights = lambda m: {n: p.detach() for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert differing_tensors(weights(sa["model"]), weights(sb["model"])) == []


@pytest.mark.parametrize("fused", [False, True])
def test_adalora_with_checkpointing_is_the_same_run(tmp_path, monkeypatch, fused):
    """The tiny BERT with dropout; fused: the fused layers and their sibling groups (q, k, v) recompute too."""
    plain, ckpt = _both(tmp_path, monkeypatch, tiny_config, "method=adalora", f"method.fused={str(fused).lower()}",
                        "train.max_steps=10", "train.eval_every=10", "method.delta_t=1")
    _assert_same_run(plain, ckpt)
    assert sum(plain[0]["final_ranks"].values()) == 2 * len(plain[0]["final_ranks"])  # pruned to the budget
    layers = dict(svd_adapters(ckpt[1]["model"]))
    assert all(m.fused is fused for m in layers.values())
    # shrink=true replaced the adapters inside the checkpointed blocks: the switch lives on the blocks
    blocks = ckpt[1]["model"].bert.encoder.layer
    assert all(b.gradient_checkpointing for b in blocks)


def _causal(tmp_path, *extra: str):
    base = ["model=tiny_llama" if o == "model=tiny_random" else o for o in TINY]
    return adarank.runner.cli.to_config(compose_config([
        *base, "task=bbc", "task.max_length=32", "train.max_steps=8", "train.batch_size=4", "data.max_train_samples=8",
        "data.max_eval_samples=2", "train.eval_every=8", f"data.cache_dir={tmp_path / 'cache'}", *extra]))


def test_adalora_on_the_tiny_llama_with_checkpointing_is_the_same_run(tmp_path, monkeypatch):
    """A decoder (its cache switched off by the blocks) with fused q/k/v and gate/up groups."""
    plain, ckpt = _both(tmp_path, monkeypatch, _causal, "method=adalora", "method.r=2", "method.fused=true")
    _assert_same_run(plain, ckpt)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_checkpointing_under_cuda_graphs_is_captured_and_trains_like_without(tmp_path):
    """train.cuda_graph=true with checkpointing: the recomputation (and its RNG rewind, capturable since torch
    2.10) is captured with the step instead of falling back to eager, and the run follows the graphed run
    without checkpointing (graph-replayed dropout draws differ in the last bits, so not bitwise)."""
    import warnings

    common = ["method=adalora", "method.fused=true", "train.device=cuda", "train.cuda_graph=true", "train.log_every=1",
              "task=sst2", f"data.dir={GLUE_FIXTURES}", "data.val_fraction=0.5"]  # the GPU machine has no tweets package
    plain = run(tiny_config(tmp_path, *common), tmp_path / "plain")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = run(tiny_config(tmp_path, *common, "train.gradient_checkpointing=true"), tmp_path / "ckpt")
    assert not [w for w in caught if "cannot be captured" in str(w.message)]
    assert ckpt["budget_curve"] == plain["budget_curve"]
    assert sum(ckpt["final_ranks"].values()) == sum(plain["final_ranks"].values())
    a = [e["train/loss"] for e in plain["train_log"]]
    b = [e["train/loss"] for e in ckpt["train_log"]]
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < 0.05 * max(abs(x) for x in a)
