"""The report's tables, as Markdown and CSV: the residual ASR and the clean-accuracy cost of each defense
against each attack, the attacks' own metrics (one row per attack), and one attack x defense table per
defense metric. A cell is the mean over seeds, ``± std`` beside it only when there are several."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from bdlab.reporting import residual
from bdlab.reporting.grid import Cell, Grid, is_attack_metric


def slug(text: str) -> str:
    """A file-name-safe form of a label."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def spread(cell: Cell) -> str:
    """``mean ± std`` over seeds; the mean alone for one seed (a single value has no spread)."""
    return f"{cell.mean:.2f}" + (f" ± {cell.std:.2f}" if cell.std is not None else "")


def show(cell: Cell, ran: bool) -> str:
    """A Markdown cell: :func:`spread`, ``missing`` (no run) or ``n/a`` (the cell's runs do not produce the
    metric, or report it as not applicable: NaN)."""
    if cell.values:
        return spread(cell) + (f" ({cell.failed} failed)" if cell.failed else "")
    return "n/a" if ran else "missing"


def metrics_of(grid: Grid) -> list[tuple[str, str]]:
    """The declared headline metrics some run of the grid reported."""
    return [(key, title) for key, title in grid.headline if key in grid.cells]


def defense_metrics(grid: Grid) -> list[tuple[str, str]]:
    """The declared metrics of the defenses (and analyses): one attack x defense table each."""
    return [(key, title) for key, title in metrics_of(grid) if not is_attack_metric(key)]


def attack_metrics(grid: Grid) -> list[tuple[str, str]]:
    """The declared metrics of the attacks: one column each of the attack table."""
    return [(key, title) for key, title in grid.headline if is_attack_metric(key) and key in grid.attack_cells]


def _all_failed(grid: Grid, row: str, column: str) -> bool:
    runs = grid.runs.get((row, column), [])
    return bool(runs) and not any(r.ok for r in runs)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown_table(grid: Grid, metric: str, columns: list[str] | None = None) -> str:
    """Attack x defense (``columns``, default all) of one metric."""
    columns = grid.columns if columns is None else columns
    rows = [[row] + ["**failed**" if _all_failed(grid, row, column)
                     else show(grid.cell(metric, row, column), (row, column) in grid.runs) for column in columns]
            for row in grid.rows]
    return _table(["attack \\ defense", *columns], rows)


def verdict(grid: Grid, row: str, column: str) -> str | None:
    """An inspector's answer in a cell: ``flagged (AIV 3.79)`` or ``missed (AIV 1.20)``; over several seeds,
    how many flagged the target (``flagged 2/3 (AIV 2.95 ± 0.80)``). None when no run of the cell gave one."""
    flagged, aiv = grid.cell(residual.FLAGGED, row, column), grid.cell(residual.AIV, row, column)
    if not flagged.values:
        return None
    hits = sum(value > 0.5 for value in flagged.values)
    word = ("flagged" if hits else "missed") if len(flagged.values) == 1 else f"flagged {hits}/{len(flagged.values)}"
    return f"{word} (AIV {spread(aiv) if aiv.values else 'n/a'})"


def residual_table(grid: Grid) -> str:
    """Attack x defense: the ASR left under each defense, or an inspector's verdict on the target."""
    rows = []
    for row in grid.rows:
        shown = []
        for column in grid.columns:
            cell = grid.cell(residual.ASR, row, column)
            if _all_failed(grid, row, column):
                shown.append("**failed**")
            elif not cell.values and (found := verdict(grid, row, column)) is not None:
                shown.append(found)
            else:
                shown.append(show(cell, (row, column) in grid.runs))
        rows.append([row, *shown])
    return _table(["attack \\ defense", *grid.columns], rows)


def residual_sources(grid: Grid) -> list[str]:
    """Per column, what its residual figures are and which keys they come from."""
    lines = []
    for column in grid.columns:
        records = [r for (_, c), runs in grid.runs.items() if c == column for r in runs if r.ok and r.residual]
        if records:
            lines.append(f"{column}: {residual.describe(records[0].residual)}")
    return lines


def attack_table(grid: Grid) -> str:
    """One row per attack, one column per attack metric: each seed's trojaned model counted once."""
    metrics = [key for key, _ in attack_metrics(grid)]
    rows = []
    for row in grid.rows:
        failed = all(_all_failed(grid, row, column) for column in grid.columns if (row, column) in grid.runs)
        cells = [grid.attack_cells[metric].get(row, Cell()) for metric in metrics]
        rows.append([row, *("**failed**" if failed else spread(cell) if cell.values else "n/a" for cell in cells)])
    return _table(["attack", *(f"`{metric}`" for metric in metrics)], rows)


def _csv_pair(cell: Cell) -> list[str]:
    """``[mean, std]`` as CSV fields: empty where there is no value, or (std) only one seed."""
    if not cell.values:
        return ["", ""]
    return [repr(cell.mean), "" if cell.std is None else repr(cell.std)]


def write_csv_table(grid: Grid, metric: str, path: Path, columns: list[str] | None = None) -> None:
    """Wide CSV: one row per attack, ``<defense>`` (mean) and ``<defense> std`` columns; empty = no value
    (std: or a single seed)."""
    columns = grid.columns if columns is None else columns
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["attack"] + [name for column in columns for name in (column, f"{column} std")])
        for row in grid.rows:
            writer.writerow([row] + [field for column in columns
                                     for field in _csv_pair(grid.cell(metric, row, column))])


def write_attack_csv(grid: Grid, path: Path) -> None:
    """The attack table as a wide CSV: one row per attack, ``<metric>`` and ``<metric> std`` columns."""
    metrics = [key for key, _ in attack_metrics(grid)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["attack"] + [name for metric in metrics for name in (metric, f"{metric} std")])
        for row in grid.rows:
            writer.writerow([row] + [field for metric in metrics
                                     for field in _csv_pair(grid.attack_cells[metric].get(row, Cell()))])


def write_long_csv(grids: list[Grid], path: Path) -> None:
    """Every numeric metric of every cell, and the residual figures (``residual/...``), one line each: the
    form for pandas and spreadsheets."""
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["setting", "attack", "defense", "metric", "mean", "std", "n", "seeds", "failed"])
        for grid in grids:
            for metric in sorted(grid.cells):
                for (row, column), cell in sorted(grid.cells[metric].items()):
                    mean = "" if math.isnan(cell.mean) else repr(cell.mean)
                    writer.writerow([grid.setting, row, column, metric, mean,
                                     "" if cell.std is None else repr(cell.std), len(cell.values),
                                     " ".join(map(str, cell.seeds)), cell.failed])
