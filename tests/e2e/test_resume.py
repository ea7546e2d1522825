"""A run killed mid-way and resumed ends bit-identical to an uninterrupted one; a diverged run keeps its checkpoint."""

from __future__ import annotations

import pytest
import torch

import adarank.runner.train
from adarank.runner import checkpoint as ckpt
from adarank.inject import svd_adapters

from . import capture_models, differing_tensors, one_thread, run, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

# 64 examples in batches of 8: 8 steps per epoch, so 20 steps cross two epoch boundaries and the default
# evaluation (every epoch) runs at steps 8, 16 and 20. adalora's final phase starts at T - t_f = 16,
# where the pruned triplets are shrunk away.
COMPARED = ("value", "best_value", "metrics", "final_ranks", "budget_curve", "steps", "trainable_params", "evals", "train_log",
            "allocation_events", "kept_triplets")


def _uninterrupted(tmp_path, monkeypatch, overrides):
    models = capture_models(monkeypatch)
    res = run(tiny_config(tmp_path, *overrides), tmp_path / "straight")
    return res, models[0]


@pytest.mark.parametrize(
    "method,every,kill",
    [
        ("lora", 5, 12),  # checkpoint at 10, killed during step 12
        ("adalora", 5, 17),  # checkpoint at 15 (before the shrink at 16), killed after the final phase began
        ("adalora", 8, 18),  # checkpoint at 16 holds the shrunk adapters, killed during step 18
    ],
)
def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, method, every, kill):
    overrides = [f"method={method}", f"train.checkpoint_every={every}", "train.log_every=3"]
    want, straight = _uninterrupted(tmp_path, monkeypatch, overrides)

    out = tmp_path / "killed"
    capture_models(monkeypatch, kill_at=kill)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tmp_path, *overrides), out)
    state = ckpt.load(str(out))
    assert state["step"] == every * ((kill - 1) // every) and not (out / "results.json").exists()
    if method == "adalora":
        assert state["allocator"]["shrunk"] == (state["step"] >= 16)

    models = capture_models(monkeypatch)
    got = run(tiny_config(tmp_path, *overrides, "resume=true"), out)
    (resumed,) = models

    for key in COMPARED:
        assert got[key] == want[key], key
    assert differing_tensors(ckpt.trainable_state(straight), ckpt.trainable_state(resumed)) == []
    if method == "adalora":  # the masks: which λ survived, module by module
        masks = [{n: (m.lam != 0) for n, m in svd_adapters(model)} for model in (straight, resumed)]
        assert differing_tensors(*masks) == []
        assert sum(got["final_ranks"].values()) == 24
    assert not (out / ckpt.CKPT_NAME).exists()


def test_resume_after_the_run_finished_returns_its_results(tmp_path):
    first = run(tiny_config(tmp_path, "method=lora", "train.max_steps=4"), tmp_path / "out")
    cfg = tiny_config(tmp_path, "method=lora", "train.max_steps=4", "resume=true")
    assert adarank.runner.train.train(cfg, str(tmp_path / "out"), log=lambda *_: None) == first


def _nan_logits_from(monkeypatch, step: int) -> None:
    """From the step-th training forward on, the classifier returns NaN (so the loss is NaN)."""
    real = adarank.runner.train.apply_method

    def spy(model, method, model_cfg):
        adapted = real(model, method, model_cfg)
        calls = 0

        def poison(module, args, output):
            nonlocal calls
            if module.training:
                calls += 1
                if calls >= step:
                    return output * float("nan")
            return None

        adapted.model.get_submodule("classifier").register_forward_hook(poison)
        return adapted

    monkeypatch.setattr(adarank.runner.train, "apply_method", spy)


@pytest.mark.parametrize("method", ["adalora", "lora"])
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, method):
    _nan_logits_from(monkeypatch, step=13)
    out = tmp_path / "out"
    cfg = tiny_config(tmp_path, f"method={method}", "train.checkpoint_every=5", "train.log_every=10")
    with pytest.raises(adarank.runner.train.TrainingDiverged, match="last good checkpoint") as info:
        run(cfg, out)
    # caught at the next checkpoint (step 15), which is not written: the one of step 10 stays
    msg = str(info.value)
    assert "not finite at step 15" in msg and "(step 10)" in msg and str(out / ckpt.CKPT_NAME) in msg
    state = ckpt.load(str(out))
    assert state["step"] == 10 and not (out / "results.json").exists()
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    fresh = adarank.runner.train.load_model("random", 3, "float32", cfg.model.random_config, vocab_size=30522)
    adarank.runner.train.apply_method(fresh, cfg.method, cfg.model)
    ckpt.load_trainable_state(fresh, state["model"])  # shapes and names fit the run's model


def test_divergence_before_any_checkpoint_says_so(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(adarank.runner.train.TrainingDiverged, match="No checkpoint had been written yet"):
        run(tiny_config(tmp_path, "method=lora", "train.lr=1e30", "train.checkpoint_every=5", "train.log_every=1"), out)
    assert not (out / ckpt.CKPT_NAME).exists() and not (out / "results.json").exists()
