"""What a scan writes into its run directory, each file atomically: ``scan.csv`` (one row per model x scanner,
with the manifest's ground truth and further columns), ``scan.json`` (the records, each scanner's population
figures and the config), ``scan.md`` (the tables) and, with ground truth, ``roc.png`` and ``detection.png``."""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from bdlab.results import git_revision, package_versions, show_value, write_json_atomic
from bdlab.scanning.manifest import ModelEntry
from bdlab.scanning.pictures import DETECTION_TITLE, detection_figure, roc_figure
from bdlab.scanning.population import (Verdict, by_scanner, detection_rates, family_of, has_ground_truth,
                                       population_metrics)

SCAN_CSV, SCAN_JSON, SCAN_MD, ROC_PNG, DETECTION_PNG = "scan.csv", "scan.json", "scan.md", "roc.png", "detection.png"
SCAN_FORMAT = 1
#: a record's columns, in the order scan.csv has them; a manifest's further columns follow
COLUMNS = ("name", "scanner", "status", "called", "flagged_classes", "aiv_max", "anomalous_class", "anomalous_score",
           "aiv_threshold", "target_flagged", "target_aiv", "top_score", "suspicious", "seconds", "cached", "trojaned",
           "target_class", "attack", "family", "model", "dataset", "weights", "overrides", "error")
#: (key, heading) of the per-scanner table
FIGURES = (("accuracy", "accuracy (%)"), ("tpr", "TPR (%)"), ("fpr", "FPR (%)"), ("auc", "ROC-AUC"),
           ("score_auc", "score ROC-AUC"), ("score_accuracy", "score accuracy (%)"),
           ("target_flagged", "target flagged (%)"), ("mean_s", "mean s/model"), ("median_s", "median s/model"),
           ("models_per_hour", "models/hour"), ("n_trojaned", "trojaned"), ("n_clean", "clean"),
           ("n_unknown", "unknown"), ("n_failed", "failed"))
_FLOATS = ("aiv_max", "anomalous_score", "target_aiv", "top_score", "aiv_threshold", "seconds")


def record(entry: ModelEntry, verdict: Verdict) -> dict[str, Any]:
    """One row of the results: the verdict, the entry it is about, and the manifest's further columns."""
    return {
        "index": entry.index, "name": entry.name, "scanner": verdict.scanner, "status": verdict.status,
        "called": int(verdict.called) if verdict.ok else None, "flagged_classes": list(verdict.flagged_classes),
        "aiv_max": verdict.aiv_max, "anomalous_class": verdict.anomalous_class,
        "anomalous_score": verdict.anomalous_score, "aiv_threshold": verdict.aiv_threshold,
        "target_flagged": None if verdict.target_flagged is None else int(verdict.target_flagged),
        "target_aiv": verdict.target_aiv, "top_score": verdict.top_score, "suspicious": verdict.suspicious,
        "seconds": verdict.seconds, "cached": verdict.cached,
        "trojaned": None if entry.trojaned is None else int(entry.trojaned), "target_class": entry.target_class,
        "attack": entry.attack, "family": entry.family, "model": entry.model, "dataset": entry.dataset,
        "weights": str(entry.weights), "overrides": " ".join(entry.overrides), "error": verdict.error,
        **{key: value for key, value in entry.extra.items() if key not in COLUMNS},
    }


def verdict_of_record(row: Mapping[str, Any]) -> Verdict:
    """The verdict a record (as scan.json holds it: NaN written as null) was made from."""
    values = {f.name: row.get(f.name) for f in fields(Verdict) if f.name in row}
    for name in _FLOATS:
        values[name] = math.nan if values.get(name) is None else float(values[name])
    if values.get("trojaned") is not None:
        values["trojaned"] = bool(values["trojaned"])
    values["error"] = values.get("error") or ""
    values["family"] = values.get("family") or ""
    values["suspicious"] = values.get("suspicious") or ""
    return Verdict(**values)


def csv_value(value: Any) -> str:
    """A CSV field: empty for not applicable (None, NaN), classes space-separated, booleans 1/0."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return repr(value) if isinstance(value, float) else str(value)


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """``write`` into a temporary file beside ``path``, then rename it into place: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(handle)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_figure(path: Path, figure: Figure) -> Path:
    return write_atomic(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))


def csv_text(records: Sequence[Mapping[str, Any]]) -> str:
    extra = list(dict.fromkeys(key for row in records for key in row if key not in COLUMNS and key != "index"))
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow([*COLUMNS, *extra])
    writer.writerows([[csv_value(row.get(key)) for key in (*COLUMNS, *extra)] for row in records])
    return stream.getvalue()


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def family_counts(verdicts: Sequence[Verdict]) -> dict[str, int]:
    """Models per family among those with ground truth (each model once)."""
    counts: dict[str, set[str]] = {}
    for verdict in verdicts:
        if verdict.trojaned is not None:
            counts.setdefault(family_of(verdict), set()).add(verdict.name)
    return {family: len(names) for family, names in counts.items()}


def verdict_cell(verdict: Verdict | None) -> str:
    if verdict is None:
        return "missing"
    if not verdict.ok:
        return "failed"
    flagged = ",".join(map(str, verdict.flagged_classes)) or "-"
    return f"{flagged} ({verdict.aiv_max:.2f})"


def markdown(summary: Mapping[str, Any], verdicts: Sequence[Verdict], records: Sequence[Mapping[str, Any]]) -> str:
    """scan.md: per-scanner figures, detection rates by family, the pictures, and every model's verdicts."""
    scanners = list(summary["population"])
    truth = has_ground_truth(verdicts)
    lines = [f"# Scan of {summary['models']} models by {', '.join(scanners)}", "",
             f"Models: `{summary['source']}`. A model is called trojaned when a scanner flags a class (largest "
             "anomaly index on its suspicious side above its threshold, 2 by default). n/a: not applicable"
             + ("." if truth else " (the population has no ground truth: only the verdicts are reported)."), "",
             "## Per scanner", "",
             table(["scanner", *(heading for _, heading in FIGURES)],
                   [[name, *(show_value(summary["population"][name][key]) for key, _ in FIGURES)]
                    for name in scanners]), ""]
    if truth:
        rates, counts = summary["detection_rates"], family_counts(verdicts)
        families = list(dict.fromkeys(family for row in rates.values() for family in row))
        lines += ["## Detection rate by attack family (%)", "",
                  "The clean column is the false-positive rate.", "",
                  table(["scanner", *(f"{f} (n={counts.get(f, 0)})" for f in families)],
                        [[name, *(show_value(rates[name].get(f, math.nan)) for f in families)] for name in scanners]),
                  "", f"![{DETECTION_TITLE}]({DETECTION_PNG})", "", f"![ROC curves]({ROC_PNG})", ""]
    found = {(v.name, v.scanner): v for v in verdicts}
    names = list(dict.fromkeys(row["name"] for row in records))
    entries = {row["name"]: row for row in records}
    lines += ["## Verdicts", "", "Flagged classes (largest AIV on the suspicious side); `-`: none flagged.", "",
              table(["model", "family", "trojaned", "target", *scanners],
                    [[name, entries[name].get("family") or "", show_value(entries[name].get("trojaned")),
                      show_value(entries[name].get("target_class")),
                      *(verdict_cell(found.get((name, s))) for s in scanners)] for name in names]), ""]
    failures = [v for v in verdicts if not v.ok]
    if failures:
        lines += ["## Failed", "", *(f"- {v.name} ({v.scanner}): {v.error}" for v in failures), ""]
    return "\n".join(lines)


def summarise(records: Sequence[Mapping[str, Any]], scanners: Sequence[str], meta: Mapping[str, Any]
              ) -> tuple[dict[str, Any], list[Verdict]]:
    """scan.json's content: ``meta`` (source, config, shard, ...), each scanner's population figures and
    detection rates by family, how many inspections came from the cache, and the records."""
    ordered = sorted(records, key=lambda row: (row["index"], scanners.index(row["scanner"])))
    verdicts = [verdict_of_record(row) for row in ordered]
    grouped = by_scanner(verdicts)
    summary = {
        "format": SCAN_FORMAT, **meta,
        "models": len({row["name"] for row in ordered}),
        "scanners": list(scanners),
        "population": {name: population_metrics(grouped.get(name, [])) for name in scanners},
        "detection_rates": {name: detection_rates(grouped.get(name, [])) for name in scanners},
        "cached": {name: {"cached": sum(bool(v.cached) for v in grouped.get(name, [])),
                          "of": len(grouped.get(name, []))} for name in scanners},
        "records": ordered,
        "versions": package_versions(),
        "git_revision": git_revision(),
    }
    return summary, verdicts


def write_outputs(out_dir: Path, records: Sequence[Mapping[str, Any]], scanners: Sequence[str],
                  meta: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Path]]:
    """Write every output of a scan (or of merged shards) into ``out_dir``; returns scan.json's content and the
    pictures written (by media key)."""
    summary, verdicts = summarise(records, scanners, meta)
    write_text_atomic(out_dir / SCAN_CSV, csv_text(summary["records"]))
    pictures: dict[str, Path] = {}
    if has_ground_truth(verdicts):
        grouped = by_scanner(verdicts)
        pictures["media/roc"] = write_figure(out_dir / ROC_PNG, roc_figure({s: grouped.get(s, []) for s in scanners}))
        pictures["media/detection"] = write_figure(
            out_dir / DETECTION_PNG, detection_figure(summary["detection_rates"], family_counts(verdicts)))
    write_text_atomic(out_dir / SCAN_MD, markdown(summary, verdicts, summary["records"]))
    write_json_atomic(out_dir / SCAN_JSON, summary)  # last: its presence says the scan's outputs are complete
    return summary, pictures
