"""Assemble a report from collected records: Markdown, CSV tables, heatmaps, trade-off curves."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bdlab.reporting import residual
from bdlab.reporting.collect import Collection
from bdlab.reporting.grid import Grid, grids, label
from bdlab.reporting.heatmaps import heatmap
from bdlab.reporting.tables import (
    attack_metrics,
    attack_table,
    defense_metrics,
    markdown_table,
    residual_sources,
    residual_table,
    slug,
    verdict,
    write_attack_csv,
    write_csv_table,
    write_long_csv,
)
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


def lead_sections(grid: Grid, out_dir: Path) -> tuple[list[str], list[Path]]:
    """The answer first: the residual ASR under each defense and its clean-accuracy cost, then the attacks'
    own metrics, once per attack; Markdown lines and the files written."""
    name = slug(grid.setting)
    lines, files = [], []
    if residual.ASR in grid.cells or residual.FLAGGED in grid.cells:
        lines += ["### Does the defense work? ASR left under each defense (%)", "", residual_table(grid), "",
                  *[f"- {line}" for line in residual_sources(grid)], ""]
        notes = {(row, column): text.replace(" (", "\n(") for row in grid.rows for column in grid.columns
                 if (text := verdict(grid, row, column)) is not None}
        files.append(heatmap(grid, residual.ASR, "ASR left under each defense (%)",
                             out_dir / "heatmaps" / f"{name}__residual_asr.png", notes=notes))
        for key in (residual.ASR, residual.FLAGGED, residual.AIV):
            if key in grid.cells:
                files.append(out_dir / "tables" / f"{name}__{slug(key)}.csv")
                write_csv_table(grid, key, files[-1])
    if residual.COST in grid.cells:
        lines += ["### What it costs: clean accuracy lost (points)", "", markdown_table(grid, residual.COST), ""]
        files.append(out_dir / "tables" / f"{name}__{slug(residual.COST)}.csv")
        write_csv_table(grid, residual.COST, files[-1])
        files.append(heatmap(grid, residual.COST, "Clean accuracy lost (points)",
                             out_dir / "heatmaps" / f"{name}__residual_cost.png"))
    if attack_metrics(grid):
        lines += ["### The attacks (each trojaned model once, whatever the defense)", "", attack_table(grid), "",
                  *[f"- `{key}`: {title}" for key, title in attack_metrics(grid)], ""]
        files.append(out_dir / "tables" / f"{name}__attacks.csv")
        write_attack_csv(grid, files[-1])
    return lines, files


def build_report(found: Collection, out_dir: Path) -> Report:
    """Write everything under ``out_dir``; the records must include at least one successful run."""
    labelled = label(found.records)
    all_grids = grids(labelled)
    trade = curves(labelled)
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    parts = ["# bdlab report", "",
             (f"{sum(r.ok for r in found.records)} successful and {sum(not r.ok for r in found.records)} failed runs "
              f"from {len({r.path.parent for r in found.records})} directories. Cells: mean ± std over seeds (the "
              "mean alone for one seed); n/a where a figure does not apply to the cell."), ""]
    for grid in all_grids:
        parts += [f"## {grid.setting}", ""]
        if not grid.cells:  # no run of this setting succeeded: show where they failed
            parts += ["### Runs", "", markdown_table(grid, ""), ""]
        lead, written = lead_sections(grid, out_dir)
        parts += lead
        files += written
        for metric, title in defense_metrics(grid):
            columns = grid.columns_of(metric)
            parts += [f"### {title} — `{metric}`", "", markdown_table(grid, metric, columns), ""]
            name = f"{slug(grid.setting)}__{slug(metric)}"
            csv_path = out_dir / "tables" / f"{name}.csv"
            write_csv_table(grid, metric, csv_path, columns)
            files += [csv_path, heatmap(grid, metric, title, out_dir / "heatmaps" / f"{name}.png", columns)]
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
