"""Measured seconds of a grid's artifacts and cells: read from a finished grid's ``results.json`` files or from a
timings file, for the makespan simulator (``python -m bdlab.bench grid``) and the dry run's estimates.

A timings file is JSON (``benchmarks/trojanzoo_timings.json`` is one)::

    {"format": "bdlab-grid-timings/1",
     "notes": "where the numbers come from (free text)",
     "artifacts": {"<key>": {"kind": "clean|trojan|inspection|autoencoder", "label": "...", "seconds": 10.0,
                             "needs": ["<key of an artifact it is built from>", ...]}, ...},
     "cells": [{"name": "badnets/neural_cleanse", "seconds": 35.0, "needs": ["<artifact key>", ...],
                "overrides": ["attack=badnets", "defense=neural_cleanse"]}, ...]}

``cells`` are in launch order; a cell's ``seconds`` is its own work once everything it needs is cached, its
``needs`` in the order it asks for them. From ``results.json`` files (a sweep directory, searched recursively):

- an artifact job of a two-phase grid (``"job": "artifact"``) gives its artifact's seconds: its data loading
  and its build (``data_load_s`` + ``build_s``, which leaves out any wait for what it is built from);
- a cell that trained a model (``artifacts.<model>.reused`` false) gives that model's seconds
  (``clean_train_s``; ``trojan_train_s`` + ``poison_s``);
- a model inspection reports its clean model's inspection time as ``defense/clean_art_s`` and MagNet its
  autoencoder's training time as ``defense/art_s`` (both as measured when built, also on a cache hit);
- a cell's own seconds are the stages its ``timings`` record (data loading, poisoned sets, evaluation,
  defense, analyses) less what it built: the models it trained and, for the cell of a one-phase grid whose
  ``defense_s`` held the shared artifact's build, that build. Time no stage records is left out: a wait on
  the cache lock for a model another cell trained, and the few seconds of set-up and writing.

What a cell needs is derived from its recorded config exactly as the planner derives it for a new grid
(:func:`bdlab.sweeping.plan.cell_artifacts`), so keys match between a finished grid and a planned one.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from bdlab.errors import ConfigError
from bdlab.results import RESULTS_FILE
from bdlab.sweeping.callback import ARTIFACT_JOB, launch_order

FORMAT = "bdlab-grid-timings/1"
#: the stages of a run the pipeline times one after another (and ``analysis_<name>_s``); its model builds
#: (``clean_train_s``, ``trojan_train_s``, ``poison_s``) are artifacts of their own, and what a defense trains
#: (``retrained_train_s``) is inside ``defense_s``
STAGES = ("data_load_s", "poison_sets_s", "evaluate_s", "defense_s")


@dataclass
class ArtifactTime:
    kind: str
    label: str
    seconds: float
    needs: tuple[str, ...] = ()


@dataclass
class CellTime:
    name: str
    seconds: float
    needs: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()


@dataclass
class GridTimings:
    """Artifacts by key and cells in launch order, each with its measured seconds."""

    artifacts: dict[str, ArtifactTime] = field(default_factory=dict)
    cells: list[CellTime] = field(default_factory=list)
    notes: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "notes": self.notes,
                "artifacts": {key: {"kind": a.kind, "label": a.label, "seconds": a.seconds, "needs": list(a.needs)}
                              for key, a in self.artifacts.items()},
                "cells": [{"name": c.name, "seconds": c.seconds, "needs": list(c.needs),
                           "overrides": list(c.overrides)} for c in self.cells]}

    def check(self, source: str) -> GridTimings:
        """Refuse (one line) a cell or artifact that needs an artifact without a time, or negative seconds."""
        for name, needs, seconds in [*((c.name, c.needs, c.seconds) for c in self.cells),
                                     *((k, a.needs, a.seconds) for k, a in self.artifacts.items())]:
            missing = [key for key in needs if key not in self.artifacts]
            if missing:
                raise ConfigError(source, f"{name} needs {missing[0]!r}, which has no entry under \"artifacts\"")
            if not seconds >= 0:
                raise ConfigError(source, f"{name} has seconds {seconds!r}; give a number >= 0")
        if not self.cells:
            raise ConfigError(source, "holds no cells")
        return self


def load_timings_file(path: Path) -> GridTimings:
    """A timings file (module docstring); a malformed one is one ConfigError line naming it."""
    try:
        payload = json.loads(path.read_text())
        if payload.get("format") != FORMAT:
            raise ConfigError(str(path), f"is not a timings file (\"format\" must be {FORMAT!r})")
        artifacts = {str(key): ArtifactTime(str(a["kind"]), str(a.get("label", key)), float(a["seconds"]),
                                            tuple(a.get("needs", ())))
                     for key, a in payload["artifacts"].items()}
        cells = [CellTime(str(c["name"]), float(c["seconds"]), tuple(c.get("needs", ())), tuple(c.get("overrides", ())))
                 for c in payload["cells"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(str(path), f"cannot be read as a timings file ({type(error).__name__}: {error})") from None
    return GridTimings(artifacts, cells, str(payload.get("notes", ""))).check(str(path))


def results_files(folder: Path) -> list[Path]:
    """Every results.json under ``folder``, in launch order (job directories are numbered: 10 after 9)."""
    return sorted(folder.rglob(RESULTS_FILE), key=launch_order)


def job_overrides(results_path: Path) -> tuple[str, ...]:
    """The task overrides Hydra saved beside a job's results.json (empty when absent)."""
    saved = results_path.parent / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        return ()
    return tuple(str(item) for item in OmegaConf.load(saved))


def _needs(results: dict[str, Any]) -> list[Any]:
    from bdlab.cache import ArtifactCache
    from bdlab.sweeping.plan import cell_artifacts

    config = OmegaConf.create(results["config"])
    names = {key: str(results.get(key, "?")) for key in ("dataset", "model", "attack", "defense")}
    return cell_artifacts(config, results["config"]["defense"], names, ArtifactCache(config.get("cache_dir", ".")))


def _model_seconds(results: dict[str, Any], kind: str) -> float | None:
    record = (results.get("artifacts") or {}).get(f"{kind}_model") or {}
    timings = results.get("timings") or {}
    if record.get("reused", True) or f"{kind}_train_s" not in timings:
        return None
    return float(timings[f"{kind}_train_s"]) + float(timings.get("poison_s", 0.0) if kind == "trojan" else 0.0)


def _shared_seconds(results: dict[str, Any], kind: str) -> float | None:
    metric = {"inspection": "defense/clean_art_s", "autoencoder": "defense/art_s"}[kind]
    value = (results.get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def _built_shared(results: dict[str, Any], kind: str, seconds: float) -> bool:
    """Whether a one-phase cell's defense time held the shared artifact's build (it was the first to ask)."""
    timings, metrics = results.get("timings") or {}, results.get("metrics") or {}
    own = float(metrics.get("defense/art_s") or 0.0) if kind == "inspection" else 0.0
    return float(timings.get("defense_s", 0.0)) >= 0.9 * (seconds + own)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and results.get("status") == "ok" else None


def from_results(paths: Iterable[Path]) -> GridTimings:
    """The timings of the runs whose results.json files are ``paths`` (launch order); failed runs and runs whose
    needs cannot be derived are left out."""
    timings = GridTimings()
    runs = [(path, results) for path in paths if (results := _read(path)) is not None]
    for _, results in runs:  # a two-phase grid's artifact jobs: exact, and no cell of it built anything
        if results.get("job") == ARTIFACT_JOB:
            artifact = results["artifact"]
            spent = results["timings"]
            timings.artifacts[artifact["key"]] = ArtifactTime(
                artifact["kind"], artifact["label"], float(spent.get("data_load_s", 0.0)) + float(spent["build_s"]),
                tuple(artifact.get("needs", ())))
    built_by_jobs = set(timings.artifacts)
    unmeasured: dict[str, Any] = {}
    for path, results in runs:
        if results.get("job") == ARTIFACT_JOB:
            continue
        try:
            needs = _needs(results)
        except Exception:  # a run of another bdlab version, or one whose classes are gone: not replayable
            continue
        own = sum(float(value) for key, value in (results.get("timings") or {}).items()
                  if key in STAGES or key.startswith("analysis_"))
        for artifact in needs:
            if artifact.key in built_by_jobs:
                continue
            model = artifact.kind in ("clean", "trojan")
            seconds = _model_seconds(results, artifact.kind) if model else _shared_seconds(results, artifact.kind)
            if seconds is None:
                continue
            built = model or _built_shared(results, artifact.kind, seconds)
            own -= seconds if built and not model else 0.0  # a model's build is a stage of its own, left out
            if artifact.key not in timings.artifacts or (built and model):
                timings.artifacts[artifact.key] = ArtifactTime(artifact.kind, artifact.label, seconds, artifact.needs)
        name = f"{results.get('attack', '?')}/{results.get('defense', '?')}"
        timings.cells.append(CellTime(name, max(own, 0.0), tuple(a.key for a in needs), job_overrides(path)))
        unmeasured.update({a.key: a for a in needs})
    for key, artifact in unmeasured.items():  # in the cache before the grid started: it cost the grid nothing
        timings.artifacts.setdefault(key, ArtifactTime(artifact.kind, f"{artifact.label} (cached before)", 0.0,
                                                       artifact.needs))
    return timings


def load_timings(source: Path) -> GridTimings:
    """A timings file, or the results.json files under a directory; one ConfigError line when there are none."""
    if source.is_file():
        return load_timings_file(source)
    if not source.is_dir():
        raise ConfigError(str(source), "is neither a sweep directory nor a timings file")
    paths = results_files(source)
    if not paths:
        raise ConfigError(str(source), f"holds no {RESULTS_FILE}; give a finished grid's directory or a timings file")
    return from_results(paths).check(str(source))


class Estimates:
    """Seconds to expect for a planned artifact or cell, from earlier timings: an artifact by its key, else by its
    label (a timings file written by hand names artifacts as the planner does); a cell by its overrides, else the
    median of earlier cells of the same attack/defense. None when nothing matches."""

    def __init__(self, timings: GridTimings | None = None) -> None:
        timings = timings or GridTimings()
        self.artifacts = {key: a.seconds for key, a in timings.artifacts.items()}
        self.labels = {a.label: a.seconds for a in timings.artifacts.values()}
        self.by_overrides = {tuple(sorted(c.overrides)): c.seconds for c in timings.cells if c.overrides}
        by_name: dict[str, list[float]] = {}
        for cell in timings.cells:
            by_name.setdefault(cell.name, []).append(cell.seconds)
        self.by_name = {name: statistics.median(values) for name, values in by_name.items()}
        self.runs = len(timings.cells)

    def artifact(self, key: str, label: str | None = None) -> float | None:
        found = self.artifacts.get(key)
        return found if found is not None or label is None else self.labels.get(label)

    def cell(self, overrides: Iterable[str], name: str) -> float | None:
        found = self.by_overrides.get(tuple(sorted(overrides)))
        return found if found is not None else self.by_name.get(name)
