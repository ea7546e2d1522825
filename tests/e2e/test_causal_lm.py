"""The causal-LM path through the runner: BBC news, a tiny random Llama, perplexity, lower-is-better
selection, and the spectrum analysis of what the runs saved."""

from __future__ import annotations

import math

import pytest

import adarank.studies.spectra
import adarank.runner.cli

from . import TINY, compose_config, run


def causal_config(tmp_path, *extra: str):
    base = ["model=tiny_llama" if o == "model=tiny_random" else o for o in TINY]
    return adarank.runner.cli.to_config(compose_config([
        *base, "task=bbc", "task.max_length=64", "train.max_steps=12", "train.eval_every=4",
        "data.max_train_samples=40", "data.max_eval_samples=16", f"data.cache_dir={tmp_path / 'cache'}", *extra]))


@pytest.mark.parametrize("method", ["lora", "adalora", "full"])
def test_causal_lm_runs_and_selects_the_lowest_validation_perplexity(tmp_path, method):
    res = run(causal_config(tmp_path, f"method={method}", "method.r=2"), tmp_path / method)
    assert res["metric"] == "ppl" and res["steps"] == 12
    evals = res["metrics"]["best"]
    assert math.isfinite(res["value"]) and res["value"] > 1
    # the best step is the one with the lowest carved-validation perplexity
    assert evals["val/ppl"] == pytest.approx(min(e for e in [res["metrics"]["best"]["val/ppl"],
                                                                res["metrics"]["final"]["val/ppl"]]))
    assert math.exp(res["metrics"]["final"]["validation/nll"]) == pytest.approx(res["value"], rel=1e-6)
    if method == "adalora":
        assert sum(res["final_ranks"].values()) == 2 * len(res["final_ranks"])


def test_spectrum_analysis_reads_the_saved_runs(tmp_path):
    dirs = []
    for method in ("lora", "full"):
        run(causal_config(tmp_path, f"method={method}", "method.r=2"), tmp_path / method)
        dirs.append(str(tmp_path / method))
    assert adarank.studies.spectra.main([*dirs, "--out", str(tmp_path / "an")]) == 0
    text = (tmp_path / "an" / "spectra.csv").read_text()
    assert "lora" in text and "full" in text
