"""The allocation controls through the command line: method=svd (adalora's SVD adapter and regulariser, no
allocation) given a learned rank pattern and its control transform; it exports to PEFT and refuses bad values
in one line naming the field."""

from __future__ import annotations

import json

import pytest

from adarank.inject import svd_adapters
from adarank.rank_pattern import load_rank_pattern, reverse_layers
from adarank.runner import cli

from . import TINY, capture_models, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = "bert.encoder.layer.{}."
#: a learned-looking pattern over the tiny BERT's 12 matrices, zeros included (results.json's final_ranks)
PATTERN = {LAYER.format(i) + t: r for i, ranks in ((0, (3, 0, 1, 2, 2, 0)), (1, (1, 1, 0, 4, 3, 2)))
           for t, r in zip(("attention.self.query", "attention.self.key", "attention.self.value",
                            "attention.output.dense", "intermediate.dense", "output.dense"), ranks)}


def test_svd_with_a_reversed_learned_pattern_trains_and_exports(tmp_path, monkeypatch):
    (tmp_path / "learned").mkdir()
    (tmp_path / "learned" / "results.json").write_text(json.dumps({"final_ranks": PATTERN}))
    models = capture_models(monkeypatch)
    out = tmp_path / "run"
    cli.main([*TINY, "train.max_steps=6", "method=svd", f"method.rank_pattern={tmp_path / 'learned'}",
              "method.rank_pattern_transform=reverse_layers", f"hydra.run.dir={out}", f"data.cache_dir={tmp_path / 'c'}"])
    res = json.loads((out / "results.json").read_text())
    want = {n: r for n, r in reverse_layers(PATTERN).items() if r}
    assert res["method"] == "svd" and res["budget"] == round(sum(PATTERN.values()) / 12, 3)
    assert res["final_ranks"] == {} and res["budget_curve"] == []  # no allocation
    assert all(e["train/orth"] >= 0 for e in res["train_log"])  # adalora's regulariser
    layers = dict(svd_adapters(models[0]))
    assert {n: m.r for n, m in layers.items()} == want  # rank 0: unadapted
    assert all(m.scale == pytest.approx(res["alpha"] / m.r) for m in layers.values())  # α/r, not α/r_init
    # exported to PEFT: the pattern loads back (its zeros too) and there is no importance to truncate by
    assert load_rank_pattern(str(out / "adapter")) == want
    assert not (out / "adapter" / "importance.safetensors").exists()


@pytest.mark.parametrize("overrides,field", [
    (["method=svd", "method.target_total_rank=10"], "method.target_total_rank"),
    (["method=svd", "method.rank_pattern=/no/such/run"], "method.rank_pattern"),
    (["method=svd", "method.rank_pattern={bert.encoder.layer.0.attention.self.query:-1}"], "method.rank_pattern"),
    (["method=svd", "method.rank_pattern={bert.encoder.layer.9.attention.self.query:2}"], "method.rank_pattern"),
    (["method=svd", "method.rank_pattern={}"], "method.rank_pattern"),
    (["method=adalora", "method.rank_pattern={bert.encoder.layer.0.attention.self.query:2}"], "method.rank_pattern"),
    (["method=svd", "method.rank_pattern_transform=uniform"], "method.rank_pattern_transform"),
])
def test_bad_control_values_are_one_line_errors_naming_the_field(capsys, tmp_path, overrides, field):
    with pytest.raises(SystemExit) as info:
        cli.main([*TINY, *overrides, f"hydra.run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'c'}"])
    assert info.value.code == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{field}: " in err, err
    assert not (tmp_path / "run" / "results.json").exists()
