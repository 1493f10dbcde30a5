"""Entry point: ``python -m bdlab.run [group=option ...]`` runs one experiment (``-m`` sweeps)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from bdlab import __version__
from bdlab.errors import ConfigError
from bdlab.loggers import build_loggers
from bdlab.pipeline import execute, prepare
from bdlab.results import RESULTS_FILE, RESULTS_FORMAT, format_table, git_revision, package_versions, write_json_atomic

log = logging.getLogger("bdlab")


def run_names(cfg: DictConfig, experiment) -> dict[str, str]:
    """The four names a results table pivots on."""
    return {"dataset": experiment.data.name, "model": str(cfg.model.name), "attack": experiment.attack.display_name,
            "defense": experiment.defense.name}


def run_experiment(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Validate, run and record one experiment; ConfigError escapes before anything is written."""
    started = time.perf_counter()
    experiment = prepare(cfg)
    loggers = build_loggers(cfg.get("logger"), output_dir)
    names = run_names(cfg, experiment)
    for logger in loggers:
        logger.log_hyperparams({**names, "seed": int(cfg.seed), "config": OmegaConf.to_container(cfg, resolve=True)})
    outcome = execute(experiment, cfg.cache_dir, output_dir, loggers)
    experiment.timings["total_s"] = time.perf_counter() - started
    results = {
        "format": RESULTS_FORMAT,
        "status": "ok",
        **names,
        "seed": int(cfg.seed),
        "metrics": outcome["metrics"],
        "timings": experiment.timings,
        "artifacts": outcome["artifacts"],
        "config": OmegaConf.to_container(cfg, resolve=True),
        "versions": package_versions(),
        "git_revision": git_revision(),
    }
    write_json_atomic(output_dir / RESULTS_FILE, results)
    for logger in loggers:
        logger.log_metrics({k: v for k, v in outcome["metrics"].items() if isinstance(v, (int, float))})
        logger.finalize("success")
    print(f"\n{names['dataset']} / {names['model']} / {names['attack']} / {names['defense']}")
    print(format_table(outcome["metrics"]))
    print(f"results: {output_dir / RESULTS_FILE}")
    return results


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run_experiment(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as error:
        print(f"bdlab: invalid config: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
