"""Log a report to W&B as one summary run: every table as a W&B Table, every picture as media."""

from __future__ import annotations

from pathlib import Path

import wandb

from bdlab.loggers import wandb_offline
from bdlab.reporting.build import Report
from bdlab.reporting.tables import metrics_of, slug


def log_summary(report: Report, out_dir: Path, project: str = "bdlab") -> str:
    """One ``job_type=report`` run (offline unless W&B is configured); returns its directory or URL."""
    run = wandb.init(project=project, job_type="report", name=f"report-{out_dir.resolve().parent.name}",
                     dir=str(out_dir), mode="offline" if wandb_offline() else "online",
                     config={"settings": [grid.setting for grid in report.grids]})
    try:
        for grid in report.grids:
            for metric, title in metrics_of(grid):
                rows = []
                for row in grid.rows:
                    for column in grid.columns:
                        cell = grid.cell(metric, row, column)
                        if cell.values:
                            rows.append([row, column, cell.mean, cell.std, len(cell.values)])
                key = f"{slug(grid.setting)}/{metric}"
                run.log({key: wandb.Table(columns=["attack", "defense", "mean", "std", "n"], data=rows)})
        for path in report.files:
            if path.suffix == ".png":
                run.log({f"media/{path.stem}": wandb.Image(str(path))})
        for curve in report.curves:
            if curve.auc is not None:
                run.summary[f"auc/{slug(curve.setting)}/{curve.attack}"] = curve.auc
        return run.url or run.dir
    finally:
        run.finish()
