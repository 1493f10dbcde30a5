"""Find and read ``results.json`` files; every unreadable one becomes one line in ``problems``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bdlab.results import RESULTS_FILE, RESULTS_FORMAT

REQUIRED = ("status", "dataset", "model", "attack", "defense", "seed", "metrics", "config")


@dataclass
class Record:
    """One run as its results.json tells it."""

    path: Path
    status: str
    dataset: str
    model: str
    attack: str
    defense: str
    seed: int | None
    metrics: dict[str, Any]
    config: dict[str, Any]
    error: dict[str, Any] | None = None
    #: (key, title) of the metrics the run's attack, defense and analyses declared for the report's tables
    headline: list[tuple[str, str]] = field(default_factory=list)
    #: which metrics answer "does the defense work" (:class:`bdlab.defenses.base.Residual`); empty in files
    #: written before runs recorded it
    residual: dict[str, Any] = field(default_factory=dict)
    #: ``artifact`` for a two-phase grid's job that built a model for its cells (bdlab.sweeping.jobs): not a cell
    job: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Collection:
    """What a set of directories holds: the records, the files that could not be used, and job
    directories that never got a results.json (killed or still running)."""

    records: list[Record] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unfinished: list[Path] = field(default_factory=list)


def read_record(path: Path) -> Record:
    """Parse one results.json; raises ValueError with a one-line reason when it cannot be used."""
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"corrupted JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot be read ({error})") from None
    if not isinstance(payload, dict) or "format" not in payload:
        raise ValueError("not a bdlab results file (no 'format' field)")
    if payload["format"] != RESULTS_FORMAT:
        raise ValueError(f"incompatible results format {payload['format']!r}; this bdlab reads format {RESULTS_FORMAT}")
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise ValueError(f"not a complete results file (missing {', '.join(missing)})")
    seed = None if payload["seed"] is None else int(payload["seed"])
    headline = [(str(key), str(title)) for key, title in payload.get("headline") or []]
    return Record(path, str(payload["status"]), str(payload["dataset"]), str(payload["model"]),
                  str(payload["attack"]), str(payload["defense"]), seed, dict(payload["metrics"]),
                  dict(payload["config"] or {}), payload.get("error"), headline, dict(payload.get("residual") or {}),
                  payload.get("job"))


def collect(paths: list[Path]) -> Collection:
    """Every results.json under ``paths`` (files or directories, searched recursively)."""
    found = Collection()
    for root in paths:
        if not root.exists():
            found.problems.append(f"{root}: no such file or directory")
            continue
        files = [root] if root.is_file() else sorted(root.rglob(RESULTS_FILE))
        if not files:
            found.problems.append(f"{root}: no {RESULTS_FILE} found")
        for path in files:
            try:
                record = read_record(path)
            except ValueError as reason:
                found.problems.append(f"{path}: skipped, {reason}")
                continue
            if record.job is None:  # an artifact job's file is not a cell; its cells carry any error it had
                found.records.append(record)
        if root.is_dir():
            # a Hydra job directory without results.json: the job never finished
            found.unfinished += [job.parent for job in sorted(root.rglob(".hydra"))
                                 if not (job.parent / RESULTS_FILE).exists()]
    return found
