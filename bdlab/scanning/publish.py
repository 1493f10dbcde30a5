"""What a finished scan (or merged sharded scan) tells beyond its files: the closing lines on the console, and
the population figures and pictures for the configured experiment loggers (W&B media; none by default)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bdlab.loggers import build_loggers, close_loggers, log_images
from bdlab.scanning.outputs import SCAN_CSV, SCAN_JSON, SCAN_MD
from bdlab.scanning.progress import duration


def log_to_loggers(logger_cfg: Any, output_dir: Path, summary: dict[str, Any], pictures: dict[str, Path],
                   group: str | None = None) -> None:
    """The population figures (``scan/<scanner>/<figure>``) and the pictures for the configured loggers (W&B media)."""
    loggers = build_loggers(logger_cfg, output_dir, group)
    try:
        for logger in loggers:
            logger.log_hyperparams({"scanners": summary["scanners"], "models": summary["models"],
                                    "config": summary["config"]})
            logger.log_metrics({f"scan/{scanner}/{key}": float(value)
                                for scanner, figures in summary["population"].items()
                                for key, value in figures.items()})
        log_images(loggers, pictures)
    except BaseException:
        close_loggers(loggers, "failed")
        raise
    close_loggers(loggers, "success")


def print_summary(summary: dict[str, Any], output_dir: Path) -> None:
    """The closing lines: what came from the cache, each scanner's headline figures, where the files are."""
    population = summary["population"]
    print(f"\nscan of {summary['models']} models by {len(summary['scanners'])} scanner(s) in "
          f"{duration(summary.get('seconds', 0.0))}")
    for scanner in summary["scanners"]:
        figures, cached = population[scanner], summary["cached"][scanner]
        failed = f", {figures['n_failed']} failed" if figures["n_failed"] else ""
        print(f"{scanner}: {cached['cached']} of {cached['of']} cached{failed}; accuracy "
              f"{show(figures['accuracy'], '%')}, TPR {show(figures['tpr'], '%')}, FPR {show(figures['fpr'], '%')}, "
              f"ROC-AUC {show(figures['auc'], '', 3)} (score {show(figures['score_auc'], '', 3)}), "
              f"{show(figures['mean_s'], ' s/model')}")
    print(f"results: {output_dir / SCAN_CSV} ({SCAN_MD}, {SCAN_JSON})")


def show(value: float, unit: str, digits: int = 1) -> str:
    """A figure with its unit, or ``n/a`` (NaN: not applicable)."""
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}{unit}"
