import csv
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import adarank
from adarank.studies.spectra import effective_rank, energy_rank, load_deltas, main, spectrum
from adarank.export import export_peft
from adarank.inject import adapters

from conftest import BERT_TARGETS, tiny_bert


@pytest.mark.parametrize("n", [1, 5, 10, 30, 64])
def test_identity(n):
    s = spectrum(torch.eye(n))
    assert s.dtype == np.float64
    assert effective_rank(s) == pytest.approx(n)
    assert energy_rank(s) == math.ceil(0.9 * n)


def test_rank_one():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(20, 1, generator=g) @ torch.randn(1, 30, generator=g)
    s = spectrum(delta)
    assert effective_rank(s) == pytest.approx(1.0, abs=1e-12)  # float32 rounding noise is cut off
    assert energy_rank(s) == 1
    assert np.count_nonzero(s) == 1


def test_diag_3_1():
    s = spectrum(torch.diag(torch.tensor([3.0, 1.0])))
    np.testing.assert_allclose(s, [3.0, 1.0])
    p = np.array([0.75, 0.25])
    assert effective_rank(s) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert energy_rank(s) == 1  # 9 / 10 of the energy
    assert energy_rank(s, 0.95) == 2


def test_zero_matrix():
    s = spectrum(torch.zeros(4, 6))
    assert effective_rank(s) == 0.0
    assert energy_rank(s) == 0


@pytest.mark.parametrize("r", [1, 3, 8])
def test_random_low_rank(r):
    g = torch.Generator().manual_seed(r)
    delta = torch.randn(48, r, generator=g) @ torch.randn(r, 40, generator=g)
    s = spectrum(delta)
    assert energy_rank(s) <= r
    assert 1 <= effective_rank(s) <= r + 1e-6
    assert np.count_nonzero(s) == r


def test_energy_rank_bad_frac():
    with pytest.raises(ValueError):
        energy_rank(np.ones(3), 0.0)


def _write_peft(run, tensors, config):
    (run / "adapter").mkdir(parents=True)
    save_file(tensors, str(run / "adapter" / "adapter_model.safetensors"))
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(config))


def test_load_deltas_peft_scale_and_patterns(tmp_path):
    g = torch.Generator().manual_seed(0)
    A1, B1 = torch.randn(4, 10, generator=g), torch.randn(6, 4, generator=g)
    A2, B2 = torch.randn(2, 10, generator=g), torch.randn(10, 2, generator=g)
    tensors = {
        "base_model.model.layers.0.q_proj.lora_A.weight": A1, "base_model.model.layers.0.q_proj.lora_B.weight": B1,
        "base_model.model.layers.1.v_proj.lora_A.weight": A2, "base_model.model.layers.1.v_proj.lora_B.weight": B2,
        "base_model.model.classifier.weight": torch.randn(2, 10, generator=g),  # a modules_to_save weight
    }
    _write_peft(tmp_path, tensors, {"r": 4, "lora_alpha": 8, "alpha_pattern": {r"layers\.1\.v_proj": 6}})
    deltas = load_deltas(tmp_path)
    assert sorted(deltas) == ["layers.0.q_proj", "layers.1.v_proj"]
    torch.testing.assert_close(deltas["layers.0.q_proj"], (B1.double() @ A1.double()) * 8 / 4)
    torch.testing.assert_close(deltas["layers.1.v_proj"], (B2.double() @ A2.double()) * 6 / 2)


def test_load_deltas_rslora(tmp_path):
    A, B = torch.randn(4, 5), torch.randn(3, 4)
    _write_peft(tmp_path, {"m.lora_A.weight": A, "m.lora_B.weight": B}, {"lora_alpha": 8, "use_rslora": True})
    torch.testing.assert_close(load_deltas(tmp_path)["m"], (B.double() @ A.double()) * 8 / 2)


def test_load_deltas_recovers_adarank_export(tmp_path):
    """Our own export (scale folded into B, alpha = r) gives back each layer's delta_weight()."""
    model = tiny_bert()
    adarank.inject(model, "lora", r=4, alpha=8.0, targets=BERT_TARGETS, rslora=True)
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero
        for _, layer in adapters(model):
            layer.lora_B.normal_()
    export_peft(model, str(tmp_path / "adapter"))
    deltas = load_deltas(tmp_path)
    assert sorted(deltas) == sorted(n for n, _ in adapters(model))
    for name, layer in adapters(model):
        torch.testing.assert_close(deltas[name].float(), layer.delta_weight(), rtol=1e-5, atol=1e-6)


def test_load_deltas_full_finetuning(tmp_path):
    d = {"encoder.dense": torch.randn(5, 7)}
    save_file(d, str(tmp_path / "delta.safetensors"))
    torch.testing.assert_close(load_deltas(tmp_path)["encoder.dense"], d["encoder.dense"])


def test_load_deltas_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="delta.safetensors"):
        load_deltas(tmp_path)


def _run(path, method, deltas):
    path.mkdir()
    save_file(deltas, str(path / "delta.safetensors"))
    (path / "results.json").write_text(json.dumps({"method": method, "task": "bbc"}))
    return str(path)


def test_cli_writes_csv_table_and_plot(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    low = {f"layers.{i}.q": torch.randn(16, 2, generator=g) @ torch.randn(2, 12, generator=g) for i in range(3)}
    full = {f"layers.{i}.q": torch.randn(16, 12, generator=g) for i in range(3)}
    runs = [_run(tmp_path / "a", "lora", low), _run(tmp_path / "b", "full", full)]
    out = tmp_path / "out"
    assert main([*runs, "--out", str(out)]) == 0
    with open(out / "spectra.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["method"] for r in rows} == {"lora", "full"}
    assert all(int(r["energy90"]) <= 2 for r in rows if r["method"] == "lora")
    assert all(float(r["s1"]) > 0 and r["s8"] for r in rows if r["method"] == "full")
    table = (out / "spectra.md").read_text()
    assert "| lora | 1 | 3 |" in table and "| full | 1 | 3 |" in table
    assert (out / "spectra.png").stat().st_size > 1000
    assert "mean erank" in capsys.readouterr().out


def test_cli_dir_without_deltas(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(empty) in err[0]
