"""PNG plots of one run: its rank pattern (layer x matrix type) and its budget schedule.

The module-name parsing the heatmap needs (`parse_module_name`, `rank_grid`) and the figure plumbing
(`new_figure`, `save_png`) are here too; the plots across runs (``adarank.studies.plots``) use them.

Figures are built with ``matplotlib.figure.Figure`` directly rather than ``pyplot``: that
needs no GUI backend (rendering goes through Agg), leaves the process-wide backend alone and
keeps no global figure registry that could leak memory over a long run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adarank.atomic import PathLike, atomic_writer

# The stack keyword and layer index, as in transformers' module names:
# bert.encoder.layer.3..., model.layers.10..., transformer.h.2..., vit.blocks.0...
_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks)\.(\d+)(?:\.|$)")
NO_LAYER = "-"


def _split_module_name(name: str) -> tuple[str, str, str]:
    """Return (stack prefix, layer, matrix type) for a module name."""
    m = _LAYER_RE.search(name)
    if m is None:
        return "", NO_LAYER, name
    prefix = name[: m.start()]
    matrix_type = name[m.end():] or NO_LAYER
    return prefix, m.group(1), matrix_type


def parse_module_name(name: str) -> tuple[str, str]:
    """Split a module name into (layer index, matrix type); layer is "-" when there is no index.

    >>> parse_module_name("model.layers.10.mlp.down_proj")
    ('10', 'mlp.down_proj')
    """
    _, layer, matrix_type = _split_module_name(name)
    return layer, matrix_type


def layer_key(layer: str) -> tuple[int, int]:
    """Sort key of a layer index from `parse_module_name`: numeric ("2" before "10"), the index-less "-" last."""
    return (1, 0) if layer == NO_LAYER else (0, int(layer))


def rank_grid(ranks: Mapping[str, int]) -> tuple[list[str], list[str], np.ndarray]:
    """Arrange ranks as a layers x matrix-types grid (NaN where a cell has no module).

    Layers are in numeric order; types keep the order in which they first appear, which is
    the model's order when ``ranks`` comes from ``named_modules``. Encoder-decoder models
    (``model.encoder.layers.0.q_proj`` and ``model.decoder.layers.0.q_proj``) would share a
    cell, so when cells collide every type is qualified by its stack prefix.
    """
    parts = {name: _split_module_name(name) for name in ranks}
    cells = {(layer, t) for _, layer, t in parts.values()}
    if len(cells) < len(parts):
        parts = {n: (p, layer, f"{p}/{t}" if p else t) for n, (p, layer, t) in parts.items()}
    layers = sorted({layer for _, layer, _ in parts.values()}, key=layer_key)
    types = list(dict.fromkeys(t for _, _, t in parts.values()))
    row = {layer: i for i, layer in enumerate(layers)}
    col = {t: j for j, t in enumerate(types)}
    grid = np.full((len(layers), len(types)), np.nan)
    for name, (_, layer, t) in parts.items():
        if not math.isnan(grid[row[layer], col[t]]):
            raise ValueError(f"two modules map to layer {layer}, type {t!r}; last was {name!r}")
        grid[row[layer], col[t]] = ranks[name]
    return layers, types, grid


def new_figure(width: float, height: float) -> Any:
    """A ``matplotlib.figure.Figure`` of `width` x `height` inches with the constrained layout."""
    from matplotlib.figure import Figure  # lazy: importing matplotlib costs ~0.3 s

    return Figure(figsize=(width, height), layout="constrained")


def save_png(fig: Any, path: PathLike) -> Path:
    """Write `fig` to `path` as a 120-dpi PNG, atomically (no partial file on failure); returns the path."""
    with atomic_writer(path) as f:
        fig.savefig(f, format="png", dpi=120)
    return Path(path)


def _rank_label(rank: float) -> str:
    return f"{int(rank)}" if float(rank).is_integer() else f"{rank:.1f}"


def rank_heatmap(ranks: Mapping[str, float], path: PathLike, title: str = "") -> Path | None:
    """Write a layer x matrix-type heatmap of ranks, each cell annotated; None if ``ranks`` is empty.

    Ranks may be means over seeds: whole numbers are written as such, others with one decimal.
    """
    if not ranks:
        return None
    layers, types, grid = rank_grid(ranks)
    fig = new_figure(1.5 + 1.1 * len(types), 1.2 + 0.35 * len(layers))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="rank")
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("matrix type")
    ax.set_ylabel("layer")
    if title:
        ax.set_title(title)
    # Text colour flips with the cell's brightness so the numbers stay readable.
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2
    for (i, j), rank in np.ndenumerate(grid):
        if np.isfinite(rank):
            colour = "black" if rank > mid else "white"
            ax.text(j, i, _rank_label(rank), ha="center", va="center", fontsize=8, color=colour)
    return save_png(fig, path)


def budget_curve(curve: Sequence[Sequence[int]], path: PathLike, title: str = "") -> Path | None:
    """Write the rank budget against the optimizer step; None if ``curve`` is empty."""
    if not curve:
        return None
    steps, budgets = zip(*[(s, b) for s, b in curve])
    fig = new_figure(6, 3.5)
    ax = fig.add_subplot()
    ax.plot(steps, budgets, drawstyle="steps-post")
    ax.set_xlabel("step")
    ax.set_ylabel("budget (total rank)")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    return save_png(fig, path)
