"""``python -m bdlab.report <run or multirun dirs> [--out DIR] [--wandb]``: tables, heatmaps, trade-off.

Per setting, it leads with the answer to "does this defense work against this attack?": the ASR left
under each defense (or an inspector's verdict on the target class) and the clean accuracy each costs,
as each run's defense category declares them; then the attacks' own figures, once per attack; then a
table per defense metric, over the defenses that report it (:mod:`bdlab.reporting.build`).

Reads ``results.json`` files only. Unreadable files are skipped with one line each; the exit
status is 1 when no successful run is left to report (nothing useful can be produced).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bdlab.reporting.build import build_report
from bdlab.reporting.collect import collect


def default_out(paths: list[Path]) -> Path:
    """``<dir>/report`` for one directory, ``./report`` for several."""
    return paths[0] / "report" if len(paths) == 1 and paths[0].is_dir() else Path("report")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bdlab.report", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="run or multirun directories, or results.json files")
    parser.add_argument("--out", type=Path, help="output directory (default: <dir>/report, or ./report)")
    parser.add_argument("--wandb", action="store_true", help="also log the tables and heatmaps as one W&B run")
    parser.add_argument("--wandb-project", default="bdlab")
    args = parser.parse_args(argv)

    found = collect(args.paths)
    for problem in found.problems:
        print(f"bdlab report: {problem}", file=sys.stderr)
    if not found.records:
        print("bdlab report: no usable results.json: nothing to report", file=sys.stderr)
        return 1
    out = args.out or default_out(args.paths)
    report = build_report(found, out)
    print(report.markdown)
    print(f"report: {out / 'report.md'} ({len(report.files)} files: tables/*.csv, heatmaps/*.png, results.csv)")
    if args.wandb:
        from bdlab.reporting.wandb_summary import log_summary  # wandb is slow to import; only when asked

        print(f"W&B: {log_summary(report, out, args.wandb_project)}")
    if not any(record.ok for record in found.records):
        print("bdlab report: every run failed: no table has a value", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
