"""Heatmap PNGs of the attack x defense tables (mean over seeds written in each cell), on each metric's
fixed colour range (:mod:`bdlab.reporting.scales`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from bdlab.reporting.grid import Grid
from bdlab.reporting.scales import colour_range


def heatmap_figure(grid: Grid, metric: str, title: str, columns: list[str] | None = None,
                   notes: dict[tuple[str, str], str] | None = None) -> Figure:
    """One metric of one grid (of ``columns``, default all); cells without a value are grey and say why, or
    show their entry of ``notes`` (e.g. an inspector's verdict in the residual-ASR map).

    A bare ``Figure`` (no pyplot): no GUI backend on servers, and notebooks display it inline.
    """
    columns = grid.columns if columns is None else columns
    notes = notes or {}
    values = np.full((len(grid.rows), len(columns)), np.nan)
    for i, row in enumerate(grid.rows):
        for j, column in enumerate(columns):
            cell = grid.cell(metric, row, column)
            if cell.values:
                values[i, j] = cell.mean
    finite = values[np.isfinite(values)]
    fixed = colour_range(metric, title)
    low, high = fixed or ((float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0))
    width = 1.6 + 1.3 * len(columns) + 0.08 * max(len(r) for r in grid.rows)
    figure = Figure(figsize=(width, 1.2 + 0.55 * len(grid.rows)))
    axes = figure.subplots()
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    image = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto", vmin=low, vmax=high)
    figure.colorbar(image, ax=axes, label=f"fixed scale {low:g} to {high:g}" if fixed else "this grid's range")
    axes.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    axes.set_yticks(range(len(grid.rows)), grid.rows)
    axes.set_xlabel("defense")
    axes.set_ylabel("attack")
    axes.set_title(f"{grid.setting}\n{title}", fontsize=10)
    for i, row in enumerate(grid.rows):
        for j, column in enumerate(columns):
            runs = grid.runs.get((row, column), [])
            if np.isfinite(values[i, j]):
                # viridis is light at its top: dark text there, light text below the middle of the range
                bright = high > low and (values[i, j] - low) / (high - low) > 0.5
                text, color = f"{values[i, j]:.2f}", "black" if bright else "white"
            elif runs and not any(r.ok for r in runs):
                text, color = "failed", "black"
            else:
                text, color = notes.get((row, column), "n/a" if runs else "missing"), "black"
            axes.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
    figure.tight_layout()
    return figure


def heatmap(grid: Grid, metric: str, title: str, path: Path, columns: list[str] | None = None,
            notes: dict[tuple[str, str], str] | None = None) -> Path:
    """Save :func:`heatmap_figure` as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    heatmap_figure(grid, metric, title, columns, notes).savefig(path, dpi=120)
    return path
