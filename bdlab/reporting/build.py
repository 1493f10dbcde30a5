"""Assemble a report from collected records: Markdown, CSV tables, heatmaps, trade-off curves."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bdlab.reporting.collect import Collection
from bdlab.reporting.grid import Grid, grids, label
from bdlab.reporting.heatmaps import heatmap
from bdlab.reporting.tables import markdown_table, metrics_of, slug, write_csv_table, write_long_csv
from bdlab.reporting.tradeoff import Curve, curves, write_curves

REPORT_FILE = "report.md"


@dataclass
class Report:
    """What was written: the Markdown text, the grids behind it and every file."""

    markdown: str
    grids: list[Grid]
    curves: list[Curve]
    files: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def failure_lines(found: Collection, all_grids: list[Grid]) -> list[str]:
    """Failed runs (with their error), cells of a grid no run reached, and unfinished job directories."""
    lines = []
    for grid in all_grids:
        for (row, column), runs in sorted(grid.runs.items()):
            for run in runs:
                if not run.ok:
                    error = run.error or {}
                    message = str(error.get("message", "")).strip().splitlines()
                    lines.append(f"failed: {grid.setting} | {row} | {column} | seed {run.seed}: "
                                 f"{error.get('type', run.status)}: {message[0] if message else ''} ({run.path})")
        for row in grid.rows:
            for column in grid.columns:
                if (row, column) not in grid.runs:
                    lines.append(f"missing: {grid.setting} | {row} | {column}: no run")
    lines += [f"missing: {path}: job directory without results.json (still running, killed or crashed)"
              for path in found.unfinished]
    return lines


def build_report(found: Collection, out_dir: Path) -> Report:
    """Write everything under ``out_dir``; the records must include at least one successful run."""
    labelled = label(found.records)
    all_grids = grids(labelled)
    trade = curves(labelled)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    parts = ["# bdlab report", "",
             f"{sum(r.ok for r in found.records)} successful and {sum(not r.ok for r in found.records)} failed runs "
             f"from {len({r.path.parent for r in found.records})} directories. Cells: mean ± std over seeds.", ""]
    for grid in all_grids:
        parts += [f"## {grid.setting}", ""]
        if not metrics_of(grid):  # no run of this setting succeeded: show where they failed
            parts += ["### Runs", "", markdown_table(grid, ""), ""]
        for metric, title in metrics_of(grid):
            parts += [f"### {title} — `{metric}`", "", markdown_table(grid, metric), ""]
            name = f"{slug(grid.setting)}__{slug(metric)}"
            csv_path = out_dir / "tables" / f"{name}.csv"
            write_csv_table(grid, metric, csv_path)
            files += [csv_path, heatmap(grid, metric, title, out_dir / "heatmaps" / f"{name}.png")]
    if trade:
        parts += ["## Efficacy-specificity trade-off (poisoning rate swept)", "",
                  "| setting | attack | poisoning rates (CAD <= 3) | AUC |", "|---|---|---|---:|"]
        for curve in trade:
            auc = f"{curve.auc:.3f}" if curve.auc is not None else f"n/a ({curve.note})"
            parts.append(f"| {curve.setting} | {curve.attack} | {', '.join(f'{r:g}' for r in curve.rates)} | {auc} |")
        parts.append("")
        files += write_curves(trade, out_dir)
        files.append(out_dir / "tradeoff.csv")
    failed = failure_lines(found, all_grids)
    parts += ["## Failed or missing cells", ""] + ([f"- {line}" for line in failed] or ["none"]) + [""]
    if found.problems:
        parts += ["## Skipped files", ""] + [f"- {line}" for line in found.problems] + [""]
    long_csv = out_dir / "results.csv"
    write_long_csv(all_grids, long_csv)
    markdown = "\n".join(parts)
    (out_dir / REPORT_FILE).write_text(markdown)
    return Report(markdown, all_grids, trade, [out_dir / REPORT_FILE, long_csv, *files], failed)
