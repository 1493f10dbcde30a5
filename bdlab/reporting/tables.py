"""The report's tables: attack x defense, one per headline metric, as Markdown and CSV."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from bdlab.reporting.grid import Cell, Grid


def slug(text: str) -> str:
    """A file-name-safe form of a label."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def show(cell: Cell, ran: bool) -> str:
    """A Markdown cell: ``mean ± std`` over seeds, ``failed``, ``missing`` (no run) or ``n/a`` (the cell's runs do
    not produce the metric, or report it as not applicable: NaN)."""
    if cell.values:
        text = f"{cell.mean:.2f}" + (f" ± {cell.std:.2f}" if len(cell.values) > 1 else "")
        return text + (f" ({cell.failed} failed)" if cell.failed else "")
    return "n/a" if ran else "missing"


def metrics_of(grid: Grid) -> list[tuple[str, str]]:
    """The declared headline metrics some run of the grid reported."""
    return [(key, title) for key, title in grid.headline if key in grid.cells]


def markdown_table(grid: Grid, metric: str) -> str:
    header = "| attack \\ defense | " + " | ".join(grid.columns) + " |"
    lines = [header, "|---|" + "---:|" * len(grid.columns)]
    for row in grid.rows:
        shown = []
        for column in grid.columns:
            runs = grid.runs.get((row, column), [])
            if runs and not any(r.ok for r in runs):
                shown.append("**failed**")
            else:
                shown.append(show(grid.cell(metric, row, column), bool(runs)))
        lines.append(f"| {row} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def write_csv_table(grid: Grid, metric: str, path: Path) -> None:
    """Wide CSV: one row per attack, ``<defense>`` (mean) and ``<defense> std`` columns; empty = no value."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["attack"] + [name for column in grid.columns for name in (column, f"{column} std")])
        for row in grid.rows:
            values = []
            for column in grid.columns:
                cell = grid.cell(metric, row, column)
                values += [repr(cell.mean), repr(cell.std)] if cell.values else ["", ""]
            writer.writerow([row] + values)


def write_long_csv(grids: list[Grid], path: Path) -> None:
    """Every numeric metric of every cell, one line each: the form for pandas and spreadsheets."""
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["setting", "attack", "defense", "metric", "mean", "std", "n", "seeds", "failed"])
        for grid in grids:
            for metric in sorted(grid.cells):
                for (row, column), cell in sorted(grid.cells[metric].items()):
                    mean = "" if math.isnan(cell.mean) else repr(cell.mean)
                    writer.writerow([grid.setting, row, column, metric, mean, repr(cell.std), len(cell.values),
                                     " ".join(map(str, cell.seeds)), cell.failed])
