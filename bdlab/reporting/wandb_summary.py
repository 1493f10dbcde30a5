"""Log a report to W&B as one summary run: every table as a W&B Table, every picture as media."""

from __future__ import annotations

from pathlib import Path

import wandb

from bdlab.loggers import wandb_offline
from bdlab.reporting import residual
from bdlab.reporting.build import Report
from bdlab.reporting.grid import Cell, Grid
from bdlab.reporting.tables import attack_metrics, defense_metrics, slug


def table_rows(grid: Grid, metric: str, columns: list[str]) -> list[list]:
    """``[attack, defense, mean, std, n]`` of each cell with a value (std None for one seed)."""
    rows = []
    for row in grid.rows:
        for column in columns:
            cell = grid.cell(metric, row, column)
            if cell.values:
                rows.append([row, column, cell.mean, cell.std, len(cell.values)])
    return rows


def log_summary(report: Report, out_dir: Path, project: str = "bdlab") -> str:
    """One ``job_type=report`` run (offline unless W&B is configured); returns its directory or URL."""
    run = wandb.init(project=project, job_type="report", name=f"report-{out_dir.resolve().parent.name}",
                     dir=str(out_dir), mode="offline" if wandb_offline() else "online",
                     config={"settings": [grid.setting for grid in report.grids]})
    try:
        for grid in report.grids:
            # the report's order: what is left of each attack under each defense and what that costs, then
            # the attacks once each, then each defense metric over the defenses that report it
            tables = [(metric, grid.columns) for metric in residual.FIELDS.values() if metric in grid.cells]
            tables += [(metric, grid.columns_of(metric)) for metric, _ in defense_metrics(grid)]
            for metric, columns in tables:
                run.log({f"{slug(grid.setting)}/{metric}": wandb.Table(
                    columns=["attack", "defense", "mean", "std", "n"], data=table_rows(grid, metric, columns))})
            for metric, _ in attack_metrics(grid):
                cells = [(row, grid.attack_cells[metric].get(row, Cell())) for row in grid.rows]
                run.log({f"{slug(grid.setting)}/{metric}": wandb.Table(
                    columns=["attack", "mean", "std", "n"],
                    data=[[row, cell.mean, cell.std, len(cell.values)] for row, cell in cells if cell.values])})
        for path in report.files:
            if path.suffix == ".png":
                run.log({f"media/{path.stem}": wandb.Image(str(path))})
        for curve in report.curves:
            if curve.auc is not None:
                run.summary[f"auc/{slug(curve.setting)}/{curve.attack}"] = curve.auc
        return run.url or run.dir
    finally:
        run.finish()
