"""IncreLoRA through the command line on the tiny GLUE files, and a run killed just before a growth step and resumed
equals the uninterrupted one bit for bit (the re-grown shapes, the padded AdamW state, the allocator's EMAs)."""

from __future__ import annotations

import json

import pytest

from adarank.runner import checkpoint as ckpt
from adarank.runner import cli

from . import GLUE_FIXTURES, TINY, capture_models, differing_tensors, one_thread, run, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

# T = 10: t_i = 1, t_f = 2, so the growth steps are 2, 4, 6 and 8; with top_h = 4 the 12 modules grow from 12 to
# 16, 20 and 24 triplets (r = 2) at steps 2, 4 and 6. The checkpoint of step 5 comes just before the third growth.
RUN = ["method=increlora", "method.r=2", "method.delta_t=2", "method.top_h=4", "train.max_steps=10",
       "train.eval_every=5", "train.checkpoint_every=5", "train.log_every=2", "task=sst2", f"data.dir={GLUE_FIXTURES}",
       "data.val_fraction=0.5"]
COMPARED = ("value", "metrics", "final_ranks", "budget_curve", "steps", "trainable_params_final", "evals", "train_log")


def test_increlora_from_the_command_line_and_resumed_across_a_growth_step(tmp_path, monkeypatch):
    straight_dir = tmp_path / "straight"
    models = capture_models(monkeypatch)
    cli.main([*TINY, *RUN, f"hydra.run.dir={straight_dir}", f"data.cache_dir={tmp_path / 'cache'}"])
    want = json.loads((straight_dir / "results.json").read_text())
    (straight,) = models
    assert [b for _, b in want["budget_curve"]] == [12, 16, 16, 20, 20, 24, 24, 24, 24, 24]
    assert sum(want["final_ranks"].values()) == 24 and want["budget"] == 2
    exported = json.loads((straight_dir / "adapter" / "adapter_config.json").read_text())
    assert sorted(exported["rank_pattern"].values()) == sorted(want["final_ranks"].values())  # every λ trained
    assert (straight_dir / "rank_heatmap.png").exists() and (straight_dir / "budget_curve.png").exists()

    out = tmp_path / "killed"
    capture_models(monkeypatch, kill_at=7)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tmp_path, *RUN), out)
    state = ckpt.load(str(out))
    assert state["step"] == 5 and sum(state["allocator"]["sizes"]) == 20 and state["allocator"]["ema_ipt"] is not None
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert sorted(m.numel() for m in moments) == sorted(v.numel() for v in state["model"].values())  # grown with it

    models = capture_models(monkeypatch)
    got = run(tiny_config(tmp_path, *RUN, "resume=true"), out)
    (resumed,) = models
    for key in COMPARED:
        assert got[key] == want[key], key
    assert differing_tensors(ckpt.trainable_state(straight), ckpt.trainable_state(resumed)) == []


def test_a_growth_window_too_short_is_one_line_before_the_model_loads(tmp_path, capsys):
    # T = 10 and delta_t = 5: the window (1, 8] holds one growth step, 1 module x 1 triplet of the 12 needed
    with pytest.raises(SystemExit) as info:
        cli.main([*TINY, *RUN, "method.delta_t=5", "method.top_h=1", f"hydra.run.dir={tmp_path / 'out'}",
                  f"data.cache_dir={tmp_path / 'cache'}"])
    assert info.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "method.top_h: 1 growth steps" in err and "short of the 12" in err
