"""Any budget from one run: a finished tiny adalora run, truncated to two budgets by `python -m adarank.export_topk`,
each truncation a PEFT adapter that gives the truncated adarank model's logits, and scored on the run's dev set."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel

from adarank.export import load_importance
from adarank.inject import svd_adapters
from adarank.rank_pattern import load_rank_pattern, resolve_ranks
from adarank.runner import cli
from adarank.runner import topk_export
from adarank.runner.methods import apply_method
from adarank.runner.train import load_base, prepare_data, setup_env
from adarank.topk import truncate_adapter

from . import capture_models, one_thread, run, tiny_config  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

KS = (5, 11)  # of the 24 triplets the run keeps (r = 2 over 12 matrices)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One run for the module: (its config, results.json, the model it trained, its folder)."""
    tmp = tmp_path_factory.mktemp("topk")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        models = capture_models(mp)
        cfg = tiny_config(tmp, "method=adalora", "train.max_steps=10")
        res = run(cfg, tmp / "run")
    torch.set_num_threads(before)
    return cfg, res, models[0], tmp / "run"


def test_two_budgets_from_one_run_load_in_peft_and_are_scored(finished, capsys):
    cfg, res, model, run_dir = finished
    assert topk_export.main([str(run_dir), "--budget", *map(str, KS), "--eval"]) == 0
    scores = load_importance(str(run_dir / "adapter"))
    assert sum(s.numel() for s in scores.values()) == 24
    env = setup_env(cfg.train, lambda *a: None)
    data = prepare_data(cfg, env)
    base = load_base(cfg, data, env)
    batch = next(iter(data.eval_sets["val"]))
    batch = {k: v for k, v in batch.items() if k != "labels"}
    names = [n for n, _ in svd_adapters(model)]
    model.eval()
    for k in KS:
        truncated = copy.deepcopy(model)
        ranks = truncate_adapter(truncated, scores, k)
        folder = run_dir / "topk" / f"budget_{k}"
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, truncated(**batch).logits, rtol=0, atol=1e-5)
        # the pattern, rank-0 modules included (left out of the adapter), loads back as a rank pattern
        assert resolve_ranks(names, load_rank_pattern(str(folder))) == ranks and 0 in ranks.values()
    rows = json.loads((run_dir / "topk" / "topk.json").read_text())
    assert [(r["budget"], r["truncated"]) for r in rows] == [(5, True), (11, True), (24, False)]
    # the untruncated adapter, loaded by PEFT on the rebuilt base, scores what the run itself scored
    assert rows[-1]["metrics"] == pytest.approx({k: v for k, v in res["metrics"]["final"].items() if k != "step"})
    assert (run_dir / "topk" / "topk.png").stat().st_size > 0 and (run_dir / "topk" / "topk.csv").is_file()
    assert "K=5: validation/accuracy = " in capsys.readouterr().out


def test_a_pattern_with_zeros_trains_as_a_control(finished, tmp_path):
    cfg, _, model, run_dir = finished
    assert topk_export.main([str(run_dir), "--budget", "5", "--out", str(tmp_path / "k")]) == 0
    folder = tmp_path / "k" / "budget_5"
    control = tiny_config(tmp_path, "method=svd", f"method.rank_pattern={folder}")
    cli.preflight(control)
    env = setup_env(control.train, lambda *a: None)
    adapted = apply_method(load_base(control, prepare_data(control, env), env), control.method, control.model)
    expected = {n: r for n, r in load_rank_pattern(str(folder)).items() if r}
    assert {n: m.r for n, m in svd_adapters(adapted.model)} == expected and sum(expected.values()) == 5


def test_bad_run_dirs_budgets_and_existing_outputs_are_one_line_errors(finished, tmp_path, capsys):
    _, _, _, run_dir = finished
    out = ["--out", str(tmp_path / "k")]
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "results.json").write_text(json.dumps({"method": "lora"}))
    cases = [([str(tmp_path / "nope"), "--budget", "3"], "RUN_DIR: "),
             ([str(tmp_path / "lora"), "--budget", "3"], "only an adalora run saves its final importance"),
             ([str(run_dir), "--budget", "3", "25", *out], "--budget: 25 is outside [1, 24]"),
             ([str(run_dir), "--budget", "0", *out], "--budget: 0 is outside"),
             ([str(run_dir), "--budget", "3", "--eval", "--device", "gpu", *out], "--device: must be auto")]
    for argv, want in cases:
        assert topk_export.main(argv) == topk_export.EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and want in err, err
    assert not (tmp_path / "k").exists()  # nothing written for a bad budget
    assert topk_export.main([str(run_dir), "--budget", "3", *out]) == 0
    assert topk_export.main([str(run_dir), "--budget", "3", "4", *out]) == topk_export.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out: " in err and "--force" in err
    assert not (tmp_path / "k" / "budget_4").exists()  # refused before writing anything
    assert topk_export.main([str(run_dir), "--budget", "3", "4", "--force", *out]) == 0
