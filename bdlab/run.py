"""Entry point: ``python -m bdlab.run [group=option ...]`` runs one experiment (``-m`` sweeps).

A single run that raises exits non-zero (2 with one line for a ConfigError, a wrong type or an unknown
option or field). A job of a multirun never stops the sweep: it records the failure (error, traceback,
config) in its ``results.json`` with ``status: failed`` and returns, so the other cells run and the
report marks this one as failed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from bdlab import plugins
from bdlab.compose import CONFIG_DIR
from bdlab.console import quiet_third_party
from bdlab.errors import ConfigError, build, check_config
from bdlab.loggers import build_loggers, close_loggers, log_images
from bdlab.media import save_poisoned_examples, save_trigger_examples
from bdlab.pipeline import execute, prepare
from bdlab.results import RESULTS_FILE, RESULTS_FORMAT, format_table, git_revision, package_versions, write_json_atomic
from bdlab.services import training_processes
from bdlab.sweeping.devices import gpu_slot

log = logging.getLogger("bdlab")


def is_rank_zero() -> bool:
    """False in the extra processes of a multi-process (DDP) run: they train but never write."""
    return rank_zero_only.rank == 0


def run_names(cfg: DictConfig, experiment) -> dict[str, str]:
    """The four names a results table pivots on."""
    return {"dataset": experiment.data.name, "model": str(cfg.model.name), "attack": experiment.attack.display_name,
            "defense": experiment.defense.name}


def config_names(cfg: DictConfig) -> dict[str, str]:
    """The same four names from the config alone, for a run that failed before (or while) building them."""
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    names = {"dataset": str(choices.get("dataset", "unknown")), "model": str(cfg.model.get("name", "unknown"))}
    for group in ("attack", "defense"):
        try:
            component = build(cfg[group])
            names[group] = component.display_name if group == "attack" else component.name
        except Exception:  # the failure being recorded may be this very one
            names[group] = str(choices.get(group, "unknown"))
    return names


def run_parameters(cfg: DictConfig) -> dict[str, Any]:
    """Top-level W&B config: each group's parameters beside its name, so dashboards pivot on both."""
    params: dict[str, Any] = {"seed": seed_or_none(cfg)}
    for group in ("dataset", "model", "attack", "defense", "trainer"):
        node = OmegaConf.to_container(cfg[group], resolve=True)
        params[f"{group}_params"] = {k: v for k, v in node.items() if not k.startswith("_")}
    return params


def run_experiment(cfg: DictConfig, output_dir: Path, group: str | None = None) -> dict[str, Any]:
    """Validate, run and record one experiment; ConfigError escapes before anything is written.

    ``group`` is the sweep this run belongs to (the W&B group). Only rank 0 of a multi-process
    run writes ``results.json``, logs and prints.
    """
    started = time.perf_counter()
    experiment = prepare(cfg)
    writer = is_rank_zero()
    loggers = build_loggers(cfg.get("logger"), output_dir, group) if writer else []
    try:
        names = run_names(cfg, experiment)
        for logger in loggers:
            logger.log_hyperparams({**names, **run_parameters(cfg), "config": OmegaConf.to_container(cfg, resolve=True)})
        outcome = execute(experiment, output_dir, loggers)
        experiment.timings["total_s"] = time.perf_counter() - started
        results = {
            "format": RESULTS_FORMAT,
            "status": "ok",
            **names,
            "seed": experiment.recipe.seed,
            "class_names": experiment.data.class_names,  # null: the dataset names none; classes are its indices
            "metrics": outcome["metrics"],
            "headline": [list(item) for item in experiment.headline_metrics()],
            "residual": experiment.defense.residual.record(),
            "timings": experiment.timings,
            "artifacts": outcome["artifacts"],
            "config": OmegaConf.to_container(cfg, resolve=True),
            "versions": package_versions(),
            "git_revision": git_revision(),
        }
        if not writer:
            return results
        write_json_atomic(output_dir / RESULTS_FILE, results)
        for logger in loggers:
            logger.log_metrics({k: v for k, v in outcome["metrics"].items() if isinstance(v, (int, float))})
        class_names = experiment.data.class_names
        media = save_trigger_examples(experiment.attack, experiment.data.test, output_dir, class_names=class_names)
        media.update(save_poisoned_examples(experiment.data.train, outcome["poisoned_train"], output_dir,
                                            class_names=class_names))
        # plots that defenses and analyses wrote into the run directory go to the dashboard too
        media.update({f"media/{png.stem}": png for png in sorted(output_dir.glob("*.png"))})
        log_images(loggers, media)
    except BaseException:
        close_loggers(loggers, "failed")
        raise
    close_loggers(loggers, "success")
    print(f"\n{names['dataset']} / {names['model']} / {names['attack']} / {names['defense']}")
    print(format_table(outcome["metrics"]))
    print(f"results: {output_dir / RESULTS_FILE}")
    return results


def seed_or_none(cfg: DictConfig) -> int | None:
    """The run's seed, or None when the seed itself is what was invalid."""
    try:
        return int(cfg.seed)
    except (TypeError, ValueError):
        return None


def resolved_or_raw(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config, or the raw one when resolving is what failed."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False)


def record_failure(cfg: DictConfig, output_dir: Path, error: BaseException) -> Path:
    """Write a ``status: failed`` results.json: what failed, where, and the config that did it."""
    path = output_dir / RESULTS_FILE
    write_json_atomic(path, {
        "format": RESULTS_FORMAT,
        "status": "failed",
        **config_names(cfg),
        "seed": seed_or_none(cfg),
        "metrics": {},
        "error": {"type": type(error).__name__, "message": str(error),
                  "traceback": "".join(traceback.format_exception(error))},
        "config": resolved_or_raw(cfg),
        "versions": package_versions(),
        "git_revision": git_revision(),
    })
    return path


def sweep_group(hydra_cfg: DictConfig) -> str:
    """The sweep's name for dashboards: its directory, less the leading ``multirun/``."""
    parts = Path(str(hydra_cfg.sweep.dir)).parts
    return "/".join(parts[1:] if len(parts) > 1 and parts[0] == "multirun" else parts)


def check_ddp_in_sweep(cfg: DictConfig) -> None:
    """Lightning starts a DDP run's extra processes by re-running the command line, which under
    ``-m`` would start the whole sweep again; SLURM (submitit) starts them itself instead."""
    if training_processes(OmegaConf.to_container(cfg.trainer, resolve=True)) > 1 and "SLURM_NTASKS" not in os.environ:
        raise ConfigError("trainer.devices", "multi-process (DDP) training inside a -m sweep needs "
                          "hydra/launcher=submitit_slurm with hydra.launcher.tasks_per_node=<devices>; "
                          "locally, run it without -m")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")  # absolute: importable too
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        check_config(cfg)  # every field's type, before the data is loaded (or downloaded)
        # parallel jobs of a sweep each take a GPU of their own when the machine has several
        if multirun:
            check_ddp_in_sweep(cfg)
        with gpu_slot(cfg, Path(cfg.cache_dir)) if multirun else nullcontext():
            run_experiment(cfg, output_dir, sweep_group(hydra_cfg) if multirun else None)
    except ConfigError as error:
        print(f"bdlab: invalid config: {error}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        if is_rank_zero():
            record_failure(cfg, output_dir, error)
    except Exception as error:
        if is_rank_zero():
            path = record_failure(cfg, output_dir, error)
            log.error("job failed: %s: %s (recorded in %s)", type(error).__name__, error, path)
        if not multirun:
            raise


def composition_error(error: ConfigCompositionException) -> ConfigError:
    """Hydra's many-line composition error as one line: an unknown option lists the group's valid ones."""
    missing, options = getattr(error, "missing_cfg_file", None), getattr(error, "options", None)
    if missing and options is not None:
        group, _, option = str(missing).rpartition("/")
        valid = ", ".join(name for name in options if not name.startswith("_"))  # sweep/_base is a helper
        return ConfigError(group, f"no option {option!r}; valid: {valid}")
    return ConfigError(getattr(error.__cause__, "full_key", None) or "overrides", " ".join(str(error).split()))


def cli() -> None:
    """:func:`main`, with Hydra's composition errors (an unknown option, file or field) as one line, exit 2."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra raises them instead of printing many lines and exiting 1
    try:
        plugins.plugin_searchpath()  # BDLAB_PLUGINS: the packages import; their conf/ joins the search path
    except ConfigError as error:
        print(f"bdlab: invalid config: {error}", file=sys.stderr)
        sys.exit(2)
    plugins.install()
    try:
        main()
    except ConfigCompositionException as error:
        print(f"bdlab: invalid config: {composition_error(error)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
