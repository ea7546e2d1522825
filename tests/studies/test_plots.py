import math

import numpy as np
import pytest

from adarank.studies.plots import (
    budget_curve,
    budget_curves,
    metric_vs_budget,
    norm_blowup,
    parse_module_name,
    rank_grid,
    rank_heatmap,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("bert.encoder.layer.3.attention.self.query", ("3", "attention.self.query")),
        ("deberta.encoder.layer.0.attention.output.dense", ("0", "attention.output.dense")),
        ("model.layers.10.mlp.down_proj", ("10", "mlp.down_proj")),
        ("base_model.model.model.layers.2.self_attn.q_proj", ("2", "self_attn.q_proj")),
        ("transformer.h.2.attn.c_attn", ("2", "attn.c_attn")),
        ("vit.blocks.11.mlp.fc1", ("11", "mlp.fc1")),
        ("classifier.dense", ("-", "classifier.dense")),
        ("lm_head", ("-", "lm_head")),
        # "h" and "layer" only count as whole name components
        ("model.mesh.3.proj", ("-", "model.mesh.3.proj")),
    ],
)
def test_parse_module_name(name, expected):
    assert parse_module_name(name) == expected


def test_rank_grid_bert_numeric_layer_order_and_nan():
    ranks = {
        "bert.encoder.layer.10.attention.self.query": 1,
        "bert.encoder.layer.2.attention.self.query": 4,
        "bert.encoder.layer.2.attention.self.value": 6,
        "bert.encoder.layer.10.attention.self.value": 0,
        "classifier": 9,
    }
    layers, types, grid = rank_grid(ranks)
    assert layers == ["2", "10", "-"]  # numeric, not "10" < "2"; index-less last
    assert types == ["attention.self.query", "attention.self.value", "classifier"]
    expected = np.array([[4, 6, np.nan], [1, 0, np.nan], [np.nan, np.nan, 9]])
    np.testing.assert_array_equal(grid, expected)


def test_rank_grid_llama_and_gpt2():
    llama = {f"model.layers.{i}.{t}": i * 10 + j
             for i in range(3) for j, t in enumerate(["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"])}
    layers, types, grid = rank_grid(llama)
    assert layers == ["0", "1", "2"]
    assert types == ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
    assert grid[2, 1] == 21 and grid.shape == (3, 3)

    gpt2 = {"transformer.h.1.attn.c_attn": 3, "transformer.h.0.mlp.c_fc": 5}
    layers, types, grid = rank_grid(gpt2)
    assert layers == ["0", "1"] and types == ["attn.c_attn", "mlp.c_fc"]
    assert math.isnan(grid[0, 0]) and grid[0, 1] == 5 and grid[1, 0] == 3 and math.isnan(grid[1, 1])


def test_rank_grid_encoder_decoder_is_qualified():
    ranks = {"model.encoder.layers.0.self_attn.q_proj": 2, "model.decoder.layers.0.self_attn.q_proj": 3}
    layers, types, grid = rank_grid(ranks)
    assert layers == ["0"]
    assert types == ["model.encoder/self_attn.q_proj", "model.decoder/self_attn.q_proj"]
    np.testing.assert_array_equal(grid, [[2, 3]])


def _is_png(path):
    return path.read_bytes()[:8] == PNG_MAGIC


def test_rank_heatmap_and_budget_curve_write_pngs(tmp_path):
    ranks = {f"model.layers.{i}.self_attn.{t}": (i + 1) * (k + 1) for i in range(4) for k, t in enumerate("qkv")}
    out = rank_heatmap(ranks, tmp_path / "plots" / "ranks.png", title="ranks")
    assert out == tmp_path / "plots" / "ranks.png" and _is_png(out)
    assert rank_heatmap({}, tmp_path / "empty.png") is None
    assert not (tmp_path / "empty.png").exists()

    out = budget_curve([[0, 96], [10, 96], [20, 60], [30, 48]], tmp_path / "budget.png", title="b")
    assert _is_png(out)
    assert budget_curve([], tmp_path / "none.png") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["budget.png", "plots"]  # no temp files


def test_rank_heatmap_of_mean_ranks_and_budget_curves_of_several_runs(tmp_path):
    means = {"bert.encoder.layer.0.attention.self.query": 2.5, "bert.encoder.layer.0.output.dense": 4.0,
             "bert.encoder.layer.1.attention.self.query": 1 / 3, "bert.encoder.layer.1.output.dense": 7}
    assert _is_png(rank_heatmap(means, tmp_path / "mean.png", title="mean over 3 seeds"))

    same = [[0, 96], [10, 60], [20, 48]]
    assert _is_png(budget_curves({"seed 0": same, "seed 1": same}, tmp_path / "same.png", title="b"))
    assert _is_png(budget_curves({"seed 0": same, "seed 1": [[0, 96], [12, 48]], "seed 2": []}, tmp_path / "d.png"))
    assert budget_curves({"seed 0": []}, tmp_path / "none.png") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "mean.png", "same.png"]


def _rows():
    rows = []
    for seed, noise in enumerate([0.0, 0.01, -0.01]):
        rows.append({"task": "rte", "method": "full", "budget": None, "seed": seed, "value": 0.8 + noise,
                     "metric": "accuracy"})
        for b in (2, 4, 8):
            rows.append({"task": "rte", "method": "lora", "budget": b, "seed": seed, "value": 0.7 + b / 100 + noise,
                         "metric": "accuracy"})
            rows.append({"task": "rte", "method": "adalora", "budget": b, "seed": seed, "value": 0.72 + b / 100,
                         "metric": "accuracy"})
    rows.append({"task": "cola", "method": "lora", "budget": 8, "seed": 0, "value": 0.5, "metric": "matthews"})
    return rows


def test_metric_vs_budget_rows_and_dataframe(tmp_path):
    out = metric_vs_budget(_rows(), tmp_path / "rte.png", "rte")
    assert _is_png(out)
    assert _is_png(metric_vs_budget(_rows(), tmp_path / "cola.png", "cola"))  # one run, no std
    assert metric_vs_budget(_rows(), tmp_path / "none.png", "mnli") is None

    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(_rows())  # the null budget becomes NaN here
    assert _is_png(metric_vs_budget(df, tmp_path / "df.png", "rte"))


def _linear_names(model):
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def test_rank_grid_on_real_module_names(bert, gpt2):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    cases = {  # model: (per-layer types, index-less modules)
        "bert": (bert, ["attention.self.query", "attention.self.key", "attention.self.value",
                        "attention.output.dense", "intermediate.dense", "output.dense"],
                 ["bert.pooler.dense", "classifier"]),
        "llama": (llama, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], ["lm_head"]),
        "gpt2": (gpt2, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"], ["lm_head"]),
    }
    for label, (model, per_layer, extra) in cases.items():
        names = _linear_names(model)
        n_layers = (len(names) - len(extra)) // len(per_layer)
        ranks = {n: i for i, n in enumerate(names)}  # rank = position, so every cell is checkable
        layers, types, grid = rank_grid(ranks)
        assert layers == [str(i) for i in range(n_layers)] + ["-"], label
        assert types == per_layer + extra, label
        assert grid.shape == (n_layers + 1, len(per_layer) + len(extra))
        # Layer rows hold only per-layer types, in model order; the "-" row only the extras.
        expected = np.full(grid.shape, np.nan)
        expected[:n_layers, :len(per_layer)] = np.arange(n_layers * len(per_layer)).reshape(n_layers, -1)
        expected[-1, len(per_layer):] = np.arange(len(extra)) + n_layers * len(per_layer)
        np.testing.assert_array_equal(grid, expected, err_msg=label)


def _norm_line(ratio, lr, scale, diverged=False, steps=20, keys=("norm/max", "norm/mean", "train/loss")):
    curve = [[t, 0.0 if t == 0 else scale * t] for t in range(steps)]  # a 0 at step 0, as LoRA starts
    return {"label": f"α/r={ratio:g}, lr={lr:g}", "ratio": ratio, "lr": lr, "diverged": diverged,
            "curves": {k: curve for k in keys}}


def test_norm_blowup_panels_styles_and_empty(tmp_path):
    lines = [_norm_line(1, 1e-3, 0.1), _norm_line(4, 1e-3, 0.4), _norm_line(4, 3e-3, 5.0, diverged=True, steps=8),
             {"label": "α/r=?, lr=?", "ratio": None, "lr": None, "diverged": True, "curves": {}}]
    assert _is_png(norm_blowup(lines, tmp_path / "n.png", title="bbc"))
    # two panels when no run logged a loss; a run with no norms at all (diverged before a checkpoint) is fine
    assert _is_png(norm_blowup([_norm_line(1, 1e-3, 0.1, keys=("norm/max", "norm/mean")), lines[-1]], tmp_path / "two.png"))
    assert norm_blowup([lines[-1]], tmp_path / "none.png") is None
    assert norm_blowup([], tmp_path / "none.png") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n.png", "two.png"]


def test_norm_blowup_draws_colour_by_ratio_and_style_by_lr(tmp_path, monkeypatch):
    from adarank.studies import plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or path)
    lines = [_norm_line(1, 1e-3, 0.1), _norm_line(4, 1e-3, 0.4), _norm_line(4, 3e-3, 5.0, diverged=True, steps=8)]
    norm_blowup(lines, tmp_path / "n.png")
    axes = figs[0].axes
    assert [ax.get_ylabel() for ax in axes] == ["norm/max", "norm/mean", "train/loss"]
    assert [ax.get_yscale() for ax in axes] == ["log", "log", "linear"]
    drawn = [ln for ln in axes[0].get_lines() if ln.get_linestyle() != "None"]
    assert [ln.get_color() for ln in drawn] == ["C0", "C1", "C1"]  # colour by α/r
    assert [ln.get_linestyle() for ln in drawn] == ["-", "-", "--"]  # style by lr
    assert len(drawn[0].get_xdata()) == 19  # the 0 at step 0 is left off the log axis
    assert len(axes[2].get_lines()[0].get_xdata()) == 20  # but kept on the loss axis
    marks = [ln for ln in axes[0].get_lines() if ln.get_marker() == "x"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [7]  # the diverged line ends in an x
    labels = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert labels == ["α/r=1, lr=0.001", "α/r=4, lr=0.001", "α/r=4, lr=0.003 (diverged)"]
