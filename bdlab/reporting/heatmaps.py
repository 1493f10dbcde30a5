"""Heatmap PNGs of the attack x defense tables (mean over seeds written in each cell)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from bdlab.reporting.grid import Grid


def heatmap_figure(grid: Grid, metric: str, title: str) -> Figure:
    """One metric of one grid; cells without a value are grey and say why.

    A bare ``Figure`` (no pyplot): no GUI backend on servers, and notebooks display it inline.
    """
    values = np.full((len(grid.rows), len(grid.columns)), np.nan)
    for i, row in enumerate(grid.rows):
        for j, column in enumerate(grid.columns):
            cell = grid.cell(metric, row, column)
            if cell.values:
                values[i, j] = cell.mean
    width = 1.6 + 1.3 * len(grid.columns) + 0.08 * max(len(r) for r in grid.rows)
    figure = Figure(figsize=(width, 1.2 + 0.55 * len(grid.rows)))
    axes = figure.subplots()
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    image = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto")
    figure.colorbar(image, ax=axes)
    axes.set_xticks(range(len(grid.columns)), grid.columns, rotation=30, ha="right")
    axes.set_yticks(range(len(grid.rows)), grid.rows)
    axes.set_xlabel("defense")
    axes.set_ylabel("attack")
    axes.set_title(f"{grid.setting}\n{title}", fontsize=10)
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i, row in enumerate(grid.rows):
        for j, column in enumerate(grid.columns):
            runs = grid.runs.get((row, column), [])
            if np.isfinite(values[i, j]):
                text, color = f"{values[i, j]:.2f}", "black" if values[i, j] > middle else "white"
            else:
                text, color = ("failed" if runs and not any(r.ok for r in runs) else "n/a" if runs else "missing"), "black"
            axes.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
    figure.tight_layout()
    return figure


def heatmap(grid: Grid, metric: str, title: str, path: Path) -> Path:
    """Save :func:`heatmap_figure` as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    heatmap_figure(grid, metric, title).savefig(path, dpi=120)
    return path
