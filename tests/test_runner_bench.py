"""The runner-level benchmark (experiments/bench/runner_bench.py): its rows, its ratios, and one smoke row end to
end through the runner's command line on a CPU (in this process: a new interpreter per row costs seconds)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench" / "runner_bench.py"


def _module():
    spec = importlib.util.spec_from_file_location("runner_bench_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_rows_and_speedups():
    rb = _module()
    assert [name for name, _ in rb.rows(["lora", "adalora"], ["auto", "eager"])] == [
        "lora/auto", "lora/eager", "adalora/auto", "adalora/eager", "peft_lora", "peft_adalora"]
    assert rb.rows(["adalora"], ["compile"], peft=False) == [("adalora/compile", ["method=adalora", "train.speed=compile"])]
    runs = {"lora/auto": {"steps_per_second": 30.0}, "lora/eager": {"steps_per_second": 20.0},
            "peft_lora": {"steps_per_second": 15.0}}
    assert rb.speedups(runs, ["lora"], ["auto", "eager"]) == {
        "lora/auto over lora/eager": 1.5, "lora/auto over peft_lora": 2.0, "lora/eager over peft_lora": round(20 / 15, 4)}
    runs["lora/eager"] = {"error": "exit 1"}  # a failed row leaves its ratios empty
    assert rb.speedups(runs, ["lora"], ["auto"])["lora/auto over lora/eager"] is None


def test_smoke_row_writes_runner_json(tmp_path):
    rb = _module()
    out = tmp_path / "runner.json"
    assert rb.main(["--smoke", "--out", str(out), "--workloads", "minilm_sst2", "--methods", "lora", "--modes", "auto",
                    "--no-peft", "--steps", "3", "--in-process"]) == 0
    res = json.loads(out.read_text())
    assert res["settings"] == {"steps": 3, "smoke": True, "methods": ["lora"], "modes": ["auto"]}
    (name, row), = res["workloads"]["minilm_sst2"]["runs"].items()
    assert name == "lora/auto" and row["steps"] == 3 and row["steps_per_second"] > 0
    assert row["speed"] == {"requested": "auto", "mode": "eager", "reason": "not a CUDA device"}  # a CPU: eager
    assert res["workloads"]["minilm_sst2"]["speedups"] == {"lora/auto over lora/eager": None,  # neither was run
                                                          "lora/auto over peft_lora": None}
    # --resume keeps a measured row (the fake command would fail if it ran again)
    rb.run_row = lambda *a: {"error": "ran again", "wall_s": 0.0}
    assert rb.main(["--smoke", "--out", str(out), "--workloads", "minilm_sst2", "--methods", "lora", "--modes", "auto",
                    "--no-peft", "--steps", "3", "--resume"]) == 0
    assert json.loads(out.read_text())["workloads"]["minilm_sst2"]["runs"]["lora/auto"] == row
