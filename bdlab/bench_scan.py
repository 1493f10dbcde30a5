"""The scanning-throughput benchmark: ``python -m bdlab.bench scan [overrides] --models 8 --scanners a,b
[--manifest zoo/manifest.csv]``.

A population scan inverts the triggers of many small models. :meth:`~bdlab.defenses.model_inspection.base.
TriggerInversion.inspect_many` inverts those of one architecture together (their weights stacked, one
forward of all of them per step); this benchmark measures what that buys. It trains, through the
cache, a population of ``--models`` models of the run's dataset and architecture (2 epochs each by
default): half trojaned by BadNets, each with another target class, half clean, each with another
seed. Then it scans the population with each scanner twice, each time in a scratch cache of its own
so that nothing is reused: one model at a time (``inspect``) and all at once (``inspect_many``). It
reports the total seconds, models per hour, the speed-up, and whether every model's flagged classes
came out the same. With ``--manifest`` the population is instead the first ``--models`` models of a zoo's
manifest (of its first row's architecture and dataset), loaded and inspected exactly as ``python -m bdlab.scan``
does, so the figures are those of a real zoo scan.
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from hydra.errors import MissingConfigException
from torch import nn

from bdlab.cache import ArtifactCache
from bdlab.compose import compose_config
from bdlab.datasets.base import DatasetSplits
from bdlab.defenses.model_inspection.base import InspectionResult, ModelInspection
from bdlab.errors import ConfigError, build
from bdlab.scanning.manifest import read_manifest
from bdlab.scanning.runner import ScanSettings, prepare_group
from bdlab.scanning.scanners import check_scanners
from bdlab.services import RunServices, create

MODES = ("one at a time", "batched")


def population(overrides: Sequence[str], count: int) -> tuple[list[nn.Module], list[str], RunServices]:
    """``count`` models of the run's dataset and architecture, trained through the cache: the first half
    (rounded up) trojaned by BadNets with target classes 0, 1, ..., the others clean with seeds 0, 1, ...;
    with their cache keys and the services of the first (whose held-out images every scan uses)."""
    trojaned = (count + 1) // 2
    first = create([*overrides, "attack=badnets"])
    classes = first.data.num_classes
    models, keys = [], []
    for i in range(trojaned):
        services = first if i == 0 else create([*overrides, "attack=badnets", f"attack.target_class={i % classes}"])
        models.append(services.trojan_model())
        keys.append(services.trojan_key())
    for seed in range(count - trojaned):
        models.append(first.clean_model(seed))
        keys.append(first.clean_key(seed))
    return models, keys, first


def manifest_population(manifest: Path, overrides: Sequence[str], count: int, scanners: Sequence[str]
                        ) -> tuple[list[nn.Module], list[str], RunServices, dict[str, ModelInspection]]:
    """The first ``count`` models of ``manifest`` that share its first row's run config, loaded as ``python -m
    bdlab.scan`` loads them; with their keys, the group's services and its scanners (built and checked as the
    scan builds them)."""
    entries = read_manifest(manifest)
    members = [entry for entry in entries if entry.group == entries[0].group][:count]
    if len(members) < count:
        raise ConfigError("--models", f"got {count}, but {manifest} has {len(members)} models of its first row's "
                          "architecture and dataset; ask for at most that many")
    cfg = compose_config([*overrides, f"defense={scanners[0]}"])  # for the seed and folders every row shares
    settings = ScanSettings(seed=int(cfg.seed), cache_dir=str(cfg.cache_dir), data_dir=str(cfg.data_dir),
                            overrides=tuple(overrides))
    group = prepare_group(members, scanners, {}, settings, {})
    loaded = [group.load(entry) for entry in members]
    return [model for model, _ in loaded], [key for _, key in loaded], group.services, group.inspectors


def scan_once(inspector: ModelInspection, mode: str, models: list[nn.Module], keys: list[str], data: DatasetSplits,
              services: RunServices) -> tuple[list[InspectionResult], float, float]:
    """Every model's inspection in ``mode``, in a scratch cache, and the wall and CPU seconds it took."""
    scratch_services = copy.copy(services)
    with tempfile.TemporaryDirectory() as scratch:
        scratch_services.cache = ArtifactCache(scratch)
        started, cpu = time.perf_counter(), time.process_time()
        if mode == "batched":
            results = inspector.inspect_many(models, data, scratch_services, keys)
        else:
            results = [inspector.inspect(model, data, scratch_services, key) for model, key in zip(models, keys)]
        return results, time.perf_counter() - started, time.process_time() - cpu


def bench_scan(overrides: Sequence[str], count: int, scanners: Sequence[str], manifest: Path | None = None
               ) -> list[dict[str, object]]:
    """One row per scanner and mode: total wall and CPU seconds (this process's, all its threads), models per
    hour, speed-up over one model at a time, whether the flagged classes agree, the largest relative difference
    of a class's score, and the models with a flagged class. The population is trained (see :func:`population`)
    or, with ``manifest``, read from a zoo (see :func:`manifest_population`)."""
    if count < 2:
        raise ConfigError("--models", f"got {count}; batching needs at least 2 models")
    if not scanners:
        raise ConfigError("--scanners", "name at least one model-inspection defense, e.g. neural_cleanse,k_arm")
    if manifest is not None:
        try:
            check_scanners(list(scanners), {})
        except ConfigError as error:
            raise ConfigError("--scanners", error.message) from None
        models, keys, services, inspectors = manifest_population(manifest, overrides, count, scanners)
        return measure(models, keys, services, inspectors)
    base = ["logger=none", "trainer.enable_progress_bar=false", "trainer.max_epochs=2", *overrides]
    inspectors = {}
    for name in scanners:  # every scanner checked before any training
        try:
            inspector = build(compose_config([*base, f"defense={name}"]).defense)
        except MissingConfigException as error:
            if f"defense/{name}" not in str(error):
                raise
            raise ConfigError("--scanners", f"there is no defense {name!r}; give model-inspection defenses such as "
                              "neural_cleanse,k_arm") from None
        if not isinstance(inspector, ModelInspection):
            raise ConfigError("--scanners", f"{name} is not a model-inspection defense; give scanners such as "
                              "neural_cleanse, tabor, k_arm, pixel")
        inspectors[name] = inspector
    models, keys, services = population(base, count)
    return measure(models, keys, services, inspectors)


def measure(models: list[nn.Module], keys: list[str], services: RunServices,
            inspectors: dict[str, ModelInspection]) -> list[dict[str, object]]:
    """Each scanner's scan of the population in both modes (see :func:`bench_scan`)."""
    from bdlab.bench import device_name  # here: bdlab.bench dispatches to this module

    count, data = len(models), services.data
    rows = []
    for name, inspector in inspectors.items():
        inspector.setup(data, services.attack)
        runs = {mode: scan_once(inspector, mode, models, keys, data, services) for mode in MODES}
        alone, together, alone_s = runs[MODES[0]][0], runs[MODES[1]][0], runs[MODES[0]][1]
        same = all(a.flagged == b.flagged for a, b in zip(alone, together))
        difference = max(float(((b.scores - a.scores).abs() / a.scores.abs().clamp_min(1e-12)).max())
                         for a, b in zip(alone, together))
        for mode, (results, seconds, cpu) in runs.items():
            rows.append({"scanner": name, "models": count, "mode": mode, "seconds": seconds, "cpu": cpu,
                         "per_hour": 3600 * count / seconds, "speedup": alone_s / seconds,
                         "identical": "yes" if same else "no", "difference": difference,
                         "flagged": sum(bool(r.flagged) for r in results),
                         "device": device_name(services.device)})
    return rows


def scan_markdown(rows: list[dict[str, object]]) -> str:
    header = ("| scanner | models | mode | total seconds | CPU seconds | models/hour | speed-up | verdicts identical | "
              "largest score difference | models flagged | device |")
    lines = [header, "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['scanner']} | {r['models']} | {r['mode']} | {r['seconds']:.1f} | {r['cpu']:.1f} | "
                     f"{r['per_hour']:.0f} | "
                     f"{r['speedup']:.2f}x | {r['identical']} | {r['difference']:.1e} | {r['flagged']} | "
                     f"{r['device']} |")
    return "\n".join(lines)
