"""Entry point: ``python -m bdlab.scan models=<manifest.csv | directory | glob> scanners=[neural_cleanse,k_arm]``
scans a population of models with model inspectors (docs/scanning.md).

Every model of the population is loaded as ``python -m bdlab.run attack=given`` loads a given model, and every
scanner inspects it with its YAML defaults (changed by ``+scanner_args.<scanner>.<field>=...``) on the same
held-out images. The run directory gets ``scan.csv``, ``scan.json``, ``scan.md`` and, where the population has
ground truth, ``roc.png`` and ``detection.png``. Inspections are cached, so a rerun skips what was scanned.
``-m shard=0,1 shards=2`` splits the models between jobs (any Hydra launcher); when the multirun ends,
:class:`~bdlab.scanning.merge.MergeShards` writes the same outputs for the whole population into the sweep folder.

Bad input (a missing weights file, weights that do not fit their architecture, a manifest without the columns it
needs, a target outside the classes, an empty directory, an unknown scanner) is one line naming the entry or field,
exit 2, before anything is scanned or written.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bdlab import plugins
from bdlab.compose import CONFIG_DIR
from bdlab.console import quiet_third_party
from bdlab.errors import ConfigError, check_keys
from bdlab.run import composition_error
from bdlab.scanning.manifest import ModelEntry, resolve_models, split_overrides
from bdlab.scanning.outputs import record, write_outputs
from bdlab.scanning.population import FAILED
from bdlab.scanning.progress import ScanProgress
from bdlab.scanning.publish import log_to_loggers, print_summary
from bdlab.scanning.runner import Group, ScanSettings, prepare_groups, scan_group
from bdlab.scanning.scanners import check_scanners, scanner_settings

log = logging.getLogger("bdlab")

#: the scan config's keys (conf/scan.yaml)
SCAN_KEYS = ("models", "scanners", "scanner_args", "overrides", "batch_models", "shard", "shards", "seed",
             "cache_dir", "data_dir", "model", "dataset", "logger")
#: the run-config groups whose fields a directory's or glob's models take from the scan's command line
FORWARDED = ("model", "dataset")


@dataclass
class ScanPlan:
    """A checked scan: the population, the scanners, the groups of models to scan (this shard's share)."""

    entries: list[ModelEntry]
    scanners: list[str]
    groups: list[Group]
    share: list[ModelEntry]
    batch_models: int
    shard: int
    shards: int
    meta: dict[str, Any] = field(default_factory=dict)


def integer(cfg: DictConfig, key: str, low: int) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(key, f"got {value!r}, must be an integer >= {low}")
    return value


def forwarded_overrides(task: list[str]) -> tuple[str, ...]:
    """The command line's ``model.*`` / ``dataset.*`` field overrides: a directory's models take them as a run
    of ``python -m bdlab.run`` would."""
    return tuple(o for o in task if o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] in FORWARDED and
                 "." in o.split("=", 1)[0])


def plan_scan(cfg: DictConfig, choices: dict[str, Any], task: list[str], output_dir: Path) -> ScanPlan:
    """Check everything a scan needs before any work (ConfigError on the first problem)."""
    check_keys(cfg, "", SCAN_KEYS)
    if OmegaConf.is_missing(cfg, "models"):
        raise ConfigError("models", "give the models to scan: models=<manifest.csv | directory | glob>")
    batch_models, shards = integer(cfg, "batch_models", 1), integer(cfg, "shards", 1)
    shard, seed = integer(cfg, "shard", 0), integer(cfg, "seed", 0)
    if shard >= shards:
        raise ConfigError("shard", f"got {shard}, must be in [0, {shards - 1}] for shards={shards}")
    scanner_args = OmegaConf.to_container(cfg.scanner_args, resolve=True) if cfg.get("scanner_args") else {}
    if not isinstance(scanner_args, dict) or not all(isinstance(v, dict) for v in scanner_args.values()):
        raise ConfigError("scanner_args", f"got {scanner_args!r}; give fields per scanner: "
                          "+scanner_args.pixel.schedule=released")
    scanners = check_scanners(OmegaConf.to_container(cfg.scanners) if OmegaConf.is_list(cfg.scanners)
                              else cfg.scanners, scanner_args)
    overrides = tuple(map(str, cfg.overrides)) if OmegaConf.is_list(cfg.overrides) else \
        split_overrides(str(cfg.overrides or ""), "overrides")
    entries = resolve_models(str(cfg.models), str(choices.get("model")), str(choices.get("dataset")),
                             forwarded_overrides(task))
    settings = ScanSettings(seed, str(cfg.cache_dir), str(cfg.data_dir), overrides, output_dir)
    groups = prepare_groups(entries, scanners, scanner_args, settings)  # every model checked, in every shard
    share = [entry for entry in entries if entry.index % shards == shard]
    meta = {"status": "ok", "source": str(cfg.models), "shard": shard, "shards": shards,
            "settings": scanner_settings({name: groups[0].inspectors[name] for name in scanners}),
            "config": OmegaConf.to_container(cfg, resolve=True)}
    return ScanPlan(entries, scanners, groups, share, batch_models, shard, shards, meta)


def execute_scan(plan: ScanPlan, output_dir: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """Scan this shard's share, group by group, and write the outputs."""
    started = time.perf_counter()
    share = {entry.name for entry in plan.share}
    by_name = {entry.name: entry for entry in plan.entries}
    progress = ScanProgress(len(plan.share) * len(plan.scanners))
    records = []
    try:
        for group in plan.groups:
            group.entries = [entry for entry in group.entries if entry.name in share]
            if group.entries:
                records += [record(by_name[v.name], v) for v in scan_group(group, plan.batch_models, progress)]
    finally:
        progress.close()
    return write_outputs(output_dir, records, plan.scanners, {**plan.meta, "seconds": time.perf_counter() - started})


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="scan")  # absolute: importable too
def main(cfg: DictConfig) -> None:
    quiet_third_party()
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        plan = plan_scan(cfg, dict(hydra_cfg.runtime.choices), list(hydra_cfg.overrides.task), output_dir)
    except ConfigError as error:
        print(f"bdlab: invalid config: {error}", file=sys.stderr)
        sys.exit(2)
    summary, pictures = execute_scan(plan, output_dir)
    if plan.shards == 1:  # a shard's share is logged once merged (bdlab.scanning.merge)
        log_to_loggers(cfg.get("logger"), output_dir, summary, pictures)
    if hydra_cfg.mode == RunMode.MULTIRUN and plan.shards > 1:
        log.info("shard %d of %d done; the multirun's end merges the shards", plan.shard, plan.shards)
        return
    print_summary(summary, output_dir)
    failed = sum(record["status"] == FAILED for record in summary["records"])
    if failed:
        log.warning("%d model scan(s) failed; scan.csv and scan.md say why", failed)


def cli() -> None:
    """:func:`main`, with Hydra's composition errors (an unknown option or field) as one line, exit 2."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        plugins.plugin_searchpath()
    except ConfigError as error:
        print(f"bdlab: invalid config: {error}", file=sys.stderr)
        sys.exit(2)
    plugins.install()
    try:
        main()
    except ConfigCompositionException as error:
        print(f"bdlab: invalid config: {composition_error(error)}", file=sys.stderr)
        sys.exit(2)
    except OverrideParseException as error:  # quote values that hold '=' or spaces: overrides='a=1 b=2'
        print(f"bdlab: invalid config: overrides: {str(error).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
