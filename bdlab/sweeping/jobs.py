"""The jobs of a two-phase grid, as Hydra task functions the launcher runs.

- :func:`build_artifact` (phase 1) builds exactly one artifact, named by the ``+build=<kind>`` override on the
  overrides of the first cell that needs it (``clean``, ``trojan``, ``inspection`` of the clean model by the
  cell's defense, ``autoencoder`` of the cell's defense), into the artifact cache, and writes a small
  ``results.json`` marked ``"job": "artifact"``: the artifact (kind, key, label, what it is built from), the
  timings and the cache entries, or ``status: failed`` with the error.
- :class:`GridCell` (phase 2) runs a cell with bdlab.run's task function, unless an artifact the cell needs
  failed to build: the cell then records that job's error as its own failure (``status: failed``) without
  running, and the grid goes on.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from bdlab.results import RESULTS_FILE, RESULTS_FORMAT, git_revision, package_versions, write_json_atomic
from bdlab.sweeping.callback import ARTIFACT_JOB

log = logging.getLogger("bdlab")

#: the override that makes a grid job an artifact job: ``+build=<kind>``
BUILD_KEY = "build"


def _build(kind: str, experiment: Any) -> float:
    """Build (or find cached) the artifact ``kind`` of the cell; returns the seconds of its own build, after
    what it is built from is there (an inspection waits for, or reads, the clean model first)."""
    services = experiment.services
    clean = services.clean_model() if kind == "inspection" else None
    started = time.perf_counter()
    if kind == "clean":
        services.clean_model()
    elif kind == "trojan":
        services.trojan_model()
    elif kind == "inspection":
        experiment.defense.inspect(clean, experiment.data, services, services.clean_key())
    elif kind == "autoencoder":
        experiment.defense.autoencoder(services)
    else:
        raise ValueError(f"unknown artifact kind {kind!r}")
    return time.perf_counter() - started


def _artifact(cfg: DictConfig, kind: str) -> dict[str, Any]:
    """The artifact record of this job: what the planner derives from the same config, so keys agree."""
    from bdlab.cache import ArtifactCache
    from bdlab.sweeping.plan import cell_artifacts

    choices = HydraConfig.get().runtime.choices
    names = {"dataset": str(choices.get("dataset", "?")), "model": str(cfg.model.get("name", "?")),
             "attack": str(choices.get("attack", "?")), "defense": str(choices.get("defense", "?"))}
    defense = OmegaConf.to_container(cfg.defense, resolve=True)
    for artifact in cell_artifacts(cfg, defense, names, ArtifactCache(cfg.cache_dir)):
        if artifact.kind == kind:
            return {"kind": kind, "key": artifact.key, "label": artifact.label, "needs": list(artifact.needs),
                    "path": str(artifact.path) if artifact.path is not None else None}
    raise ValueError(f"this cell's config needs no {kind} artifact")


def _error(error: BaseException) -> dict[str, str]:
    return {"type": type(error).__name__, "message": str(error),
            "traceback": "".join(traceback.format_exception(error))}


def build_artifact(cfg: DictConfig) -> None:
    """Phase-1 task function: build the artifact ``cfg.build`` names and record it (module docstring)."""
    from bdlab.console import quiet_third_party
    from bdlab.errors import ConfigError
    from bdlab.loggers import build_loggers, close_loggers
    from bdlab.pipeline import prepare
    from bdlab.run import check_ddp_in_sweep, config_names, is_rank_zero, resolved_or_raw, run_names, seed_or_none
    from bdlab.run import sweep_group
    from bdlab.sweeping.devices import gpu_slot

    quiet_third_party()
    started = time.perf_counter()
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    with open_dict(cfg):
        kind = str(cfg.pop(BUILD_KEY))
    artifact: dict[str, Any] = {"kind": kind}
    loggers: list[Any] = []
    try:
        artifact = _artifact(cfg, kind)
        check_ddp_in_sweep(cfg)
        with gpu_slot(cfg, Path(cfg.cache_dir)):
            experiment = prepare(cfg, output_dir)
            names = run_names(cfg, experiment)
            if is_rank_zero():
                loggers = build_loggers(cfg.get("logger"), output_dir, sweep_group(hydra_cfg))
            for logger in loggers:  # the training curves go to the grid's W&B group, as an artifact job
                logger.log_hyperparams({**names, "job": f"{ARTIFACT_JOB}/{kind}"})
            experiment.services.loggers = loggers
            log.info("artifact job: building the %s", artifact["label"])
            experiment.timings["build_s"] = _build(kind, experiment)
        experiment.timings["total_s"] = time.perf_counter() - started
        results = {"format": RESULTS_FORMAT, "status": "ok", "job": ARTIFACT_JOB, "artifact": artifact, **names,
                   "seed": experiment.recipe.seed, "metrics": {}, "timings": experiment.timings,
                   "artifacts": experiment.services.artifacts, "config": OmegaConf.to_container(cfg, resolve=True),
                   "versions": package_versions(), "git_revision": git_revision()}
    except Exception as error:
        close_loggers(loggers, "failed")
        if isinstance(error, ConfigError):
            print(f"bdlab: invalid config: {error}", file=sys.stderr)
        else:
            log.error("artifact job failed: %s: %s", type(error).__name__, error)
        if is_rank_zero():
            write_json_atomic(output_dir / RESULTS_FILE, {
                "format": RESULTS_FORMAT, "status": "failed", "job": ARTIFACT_JOB, "artifact": artifact,
                **config_names(cfg), "seed": seed_or_none(cfg), "metrics": {}, "error": _error(error),
                "config": resolved_or_raw(cfg), "versions": package_versions(), "git_revision": git_revision()})
        return
    close_loggers(loggers, "success")
    if is_rank_zero():
        write_json_atomic(output_dir / RESULTS_FILE, results)
    print(f"built the {artifact['label']}: {output_dir / RESULTS_FILE}")


class GridCell:
    """Phase-2 task function: ``task`` (bdlab.run's) for each cell, except the cells in ``failed`` (by job
    number: the failed artifact job's results.json and the artifact's label), which record that failure."""

    def __init__(self, task: Callable[[DictConfig], Any]) -> None:
        self.task = task
        self.failed: dict[int, tuple[Path, str]] = {}

    def __call__(self, cfg: DictConfig) -> Any:
        failed = self.failed.get(int(HydraConfig.get().job.num))
        if failed is None:
            return self.task(cfg)
        record_failed_artifact(cfg, Path(HydraConfig.get().runtime.output_dir), *failed)
        return None


def failed_job_error(results_path: Path) -> dict[str, str]:
    """The error an artifact job recorded, or one saying it recorded none (killed, timed out)."""
    import json

    try:
        error = json.loads(results_path.read_text()).get("error")
    except (OSError, ValueError):
        error = None
    if isinstance(error, dict):
        return error
    return {"type": "ArtifactJobFailed", "traceback": "",
            "message": f"the artifact job wrote no error (killed or timed out?); see its log in {results_path.parent}"}


def record_failed_artifact(cfg: DictConfig, output_dir: Path, job_results: Path, label: str) -> Path:
    """Write the cell's ``status: failed`` results.json carrying the failed artifact job's error."""
    from bdlab.run import config_names, is_rank_zero, resolved_or_raw, seed_or_none

    error = {**failed_job_error(job_results), "artifact": label, "artifact_job": str(job_results.parent)}
    path = output_dir / RESULTS_FILE
    if is_rank_zero():
        write_json_atomic(path, {
            "format": RESULTS_FORMAT, "status": "failed", **config_names(cfg), "seed": seed_or_none(cfg),
            "metrics": {}, "error": error, "config": resolved_or_raw(cfg), "versions": package_versions(),
            "git_revision": git_revision()})
    log.error("cell not run: the %s failed to build (%s: %s); recorded in %s", label, error["type"],
              error["message"], path)
    return path
