"""Heatmap PNGs of the attack x defense tables (mean over seeds written in each cell)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bdlab.reporting.grid import Grid  # noqa: E402


def heatmap(grid: Grid, metric: str, title: str, path: Path) -> Path:
    """Draw one metric of one grid; cells without a value are grey and say why."""
    values = np.full((len(grid.rows), len(grid.columns)), np.nan)
    for i, row in enumerate(grid.rows):
        for j, column in enumerate(grid.columns):
            cell = grid.cell(metric, row, column)
            if cell.values:
                values[i, j] = cell.mean
    width = 1.6 + 1.3 * len(grid.columns) + 0.08 * max(len(r) for r in grid.rows)
    figure, axes = plt.subplots(figsize=(width, 1.2 + 0.55 * len(grid.rows)))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
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
                text, color = ("failed" if runs and not any(r.ok for r in runs) else "–" if runs else "missing"), "black"
            axes.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
