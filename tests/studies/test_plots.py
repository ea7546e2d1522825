"""adarank.studies.plots: the plots across runs (budget schedules of several seeds, metric vs budget, norm blow-up)."""

import pytest

from adarank.runner.plots import rank_heatmap
from adarank.studies.plots import budget_curves, metric_vs_budget, norm_blowup

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    return path.read_bytes()[:8] == PNG_MAGIC


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
    monkeypatch.setattr(plots, "save_png", lambda fig, path: figs.append(fig) or path)
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
