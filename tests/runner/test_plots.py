"""adarank.runner.plots: a run's own plots (rank heatmap, budget schedule) and the module-name parsing they use."""

import math

import numpy as np
import pytest

from adarank.runner.plots import (
    budget_curve,
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
