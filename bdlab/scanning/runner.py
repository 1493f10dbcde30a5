"""Scan a population: group the models by run config, check every group before any work, then inspect each
group's models in chunks with every scanner, recording each model's verdict (or failure) as it comes.

A model is loaded exactly as ``python -m bdlab.run attack=given model=<model> dataset=<dataset>
model.weights=<weights> <overrides>`` loads it (:class:`~bdlab.attacks.given.GivenModel`,
:meth:`RunServices.trojan_model`), and inspected under the key such a run uses (the digest of its weights), so a
scan and a single run share their inspections through the artifact cache, and a rerun of a scan reads them back.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bdlab.cache import ArtifactCache, Tensors
from bdlab.compose import compose_config
from bdlab.datasets.base import DatasetSplits
from bdlab.defenses.model_inspection.base import InspectionResult, ModelInspection, inspection_metrics, suspicious_side
from bdlab.errors import ConfigError, build, check_config
from bdlab.models.weights import backbone_state, read_state_dict
from bdlab.run import composition_error
from bdlab.scanning.manifest import ModelEntry
from bdlab.scanning.population import FAILED, Verdict
from bdlab.scanning.progress import ScanProgress
from bdlab.scanning.scanners import build_scanner, check_scanner
from bdlab.services import RunServices, resolve_device

log = logging.getLogger("bdlab")


class CountingCache(ArtifactCache):
    """The artifact cache, remembering for each inspection (kind, model key) whether the scan's first request for
    it found it cached (a batched inspector stores a result and then reads it back: that is not a cache hit)."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self.reused: dict[tuple[str, str], bool] = {}

    def get_or_build(self, kind: str, spec: dict[str, Any], build_tensors: Any, validate: Any = None
                     ) -> tuple[Tensors, bool]:
        tensors, reused = super().get_or_build(kind, spec, build_tensors, validate)
        if kind.startswith("inspection/"):
            self.reused.setdefault((kind, str(spec.get("model"))), reused)
        return tensors, reused


@dataclass(frozen=True)
class ScanSettings:
    """What every model's run config shares: the seed, the cache and data folders, the scan's own overrides."""

    seed: int
    cache_dir: str
    data_dir: str
    overrides: tuple[str, ...] = ()
    output_dir: Path = Path(".")


def quoted(value: Any) -> str:
    """A value Hydra's override parser reads back as the same string, whatever characters a path holds."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def run_overrides(entry: ModelEntry, settings: ScanSettings, scanner: str) -> list[str]:
    """The overrides of the run that would scan ``entry`` with ``scanner`` (``python -m bdlab.run ...``)."""
    return ["attack=given", f"model={entry.model}", f"dataset={entry.dataset}", f"defense={scanner}",
            f"model.weights={quoted(entry.weights.resolve())}", "logger=none", f"seed={settings.seed}",
            f"cache_dir={quoted(settings.cache_dir)}", f"data_dir={quoted(settings.data_dir)}",
            *settings.overrides, *entry.overrides]


def compose_run(overrides: list[str]) -> DictConfig:
    """The run config for ``overrides``: through the running Hydra app's search path inside ``python -m
    bdlab.scan`` (Hydra refuses a second initialisation), through :func:`bdlab.compose.compose_config` outside."""
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides)
    return compose_config(overrides)


@contextmanager
def naming(entry: ModelEntry) -> Iterator[None]:
    """Re-raise a ConfigError about a model's run config under the entry's name (``models[x].dataset.size``;
    its weights as ``models[x].weights``); scanner errors keep the scan's own field."""
    try:
        yield
    except ConfigCompositionException as error:
        inner = composition_error(error)
        raise ConfigError(f"{entry.field}.{inner.field}", inner.message) from None
    except ConfigError as error:
        if error.field.startswith(("scanner_args", "scanners", "models[")):
            raise
        inner = "weights" if error.field == "model.weights" else error.field
        raise ConfigError(f"{entry.field}.{inner}", error.message) from None


@dataclass
class Group:
    """Models sharing a run config but for their weights: one dataset load, the scanners built once, one batch."""

    entries: list[ModelEntry]
    cfg: DictConfig
    data: DatasetSplits
    services: RunServices
    inspectors: dict[str, ModelInspection] = field(default_factory=dict)

    @property
    def cache(self) -> CountingCache:
        return self.services.cache  # type: ignore[return-value]

    def load(self, entry: ModelEntry) -> tuple[nn.Module, str]:
        """``entry``'s model as attack=given loads it, and its cache key (the digest of its weights)."""
        cfg = copy.deepcopy(self.cfg)
        cfg.model.weights = str(entry.weights.resolve())
        services = RunServices(cfg, self.data, attack=self.services.attack, cache=self.cache,
                               device=self.services.device, output_dir=self.services.output_dir)
        return services.trojan_model(), services.trojan_key()


def check_entry(entry: ModelEntry, fresh: nn.Module, data: DatasetSplits) -> None:
    """The entry's weights fit the group's architecture key by key and shape by shape, and its target is a class."""
    where = f"{entry.field}.weights"
    backbone_state(read_state_dict(entry.weights, where), getattr(fresh, "net", fresh), where)
    if entry.target_class is not None and not 0 <= entry.target_class < data.num_classes:
        raise ConfigError(f"{entry.field}.target_class", f"got {entry.target_class}, must be in "
                          f"[0, {data.num_classes - 1}] for {data.name}'s {data.num_classes} classes")


def prepare_group(entries: list[ModelEntry], scanners: Sequence[str], scanner_args: Mapping[str, Any],
                  settings: ScanSettings, datasets: dict[str, DatasetSplits]) -> Group:
    """Compose the group's run config once per scanner, load its data (once per dataset config, kept in
    ``datasets``), build and check the scanners, and check every entry's weights and ground truth; raises
    ConfigError before any work."""
    first = entries[0]
    with naming(first):
        cfgs = {name: compose_run(run_overrides(first, settings, name)) for name in scanners}
        cfg = cfgs[scanners[0]]
        for composed in cfgs.values():
            check_config(composed)
        key = json.dumps(OmegaConf.to_container(cfg.dataset, resolve=True), sort_keys=True, default=str)
        if key not in datasets:
            datasets[key] = build(cfg.dataset).load()
        data = datasets[key]
        attack = build(cfg.attack)
        services = RunServices(cfg, data, attack=attack, cache=CountingCache(cfg.cache_dir),
                               device=resolve_device(cfg.trainer), output_dir=settings.output_dir)
        fresh = services.new_model()  # the first model's weights load here: a mismatch is named below, per row
        attack.setup(data, services)
    group = Group(entries, cfg, data, services)
    for name in scanners:
        group.inspectors[name] = build_scanner(cfgs[name], name, scanner_args.get(name))
        check_scanner(group.inspectors[name], name, data, services)
    for entry in entries:
        check_entry(entry, fresh, data)
    return group


def prepare_groups(entries: Sequence[ModelEntry], scanners: Sequence[str], scanner_args: Mapping[str, Any],
                   settings: ScanSettings) -> list[Group]:
    """Every group of the population, checked (see :func:`prepare_group`)."""
    grouped: dict[tuple[str, str, tuple[str, ...]], list[ModelEntry]] = {}
    for entry in entries:
        grouped.setdefault(entry.group, []).append(entry)
    datasets: dict[str, DatasetSplits] = {}
    return [prepare_group(members, scanners, scanner_args, settings, datasets) for members in grouped.values()]


def error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def verdict_of(entry: ModelEntry, scanner: str, inspector: ModelInspection, result: InspectionResult,
               cached: bool | None) -> Verdict:
    """The verdict of one inspection: flagged classes, the largest AIV on the suspicious side (as the inspection
    protocol reports it) and the score of that most anomalous class, the true target's signed AIV, the seconds it
    took."""
    side = suspicious_side(result.scores, result.suspicious)
    target = entry.target_class if entry.trojaned else None
    target_aiv = float("nan") if target is None else float(result.aiv[target]) * (1.0 if side[target] else -1.0)
    top = {"low": result.scores.min, "high": result.scores.max}.get(result.suspicious)
    top_score = float("nan") if top is None else float(top())
    anomalous = max((k for k in range(len(side)) if side[k]), key=lambda k: float(result.aiv[k]), default=None)
    return Verdict(entry.name, scanner, flagged_classes=[int(k) for k in result.flagged],
                   aiv_max=float(inspection_metrics(result, "")["aiv_max"]), anomalous_class=anomalous,
                   anomalous_score=float(result.scores[anomalous]) if anomalous is not None else float("nan"),
                   target_aiv=target_aiv, top_score=top_score, suspicious=result.suspicious,
                   aiv_threshold=inspector.aiv_threshold, seconds=float(result.seconds), cached=cached,
                   trojaned=entry.trojaned, target_class=entry.target_class, family=entry.family)


def failed(entry: ModelEntry, scanner: str, error: BaseException) -> Verdict:
    return Verdict(entry.name, scanner, status=FAILED, error=error_text(error), trojaned=entry.trojaned,
                   target_class=entry.target_class, family=entry.family)


def inspect_chunk(inspector: ModelInspection, group: Group, models: list[nn.Module],
                  keys: list[str]) -> list[InspectionResult | BaseException]:
    """``inspect_many`` on the chunk; if it raises, each model alone, so one bad model fails alone (inspections
    already stored come back from the cache)."""
    try:
        return list(inspector.inspect_many(models, group.data, group.services, keys))
    except Exception as error:
        if len(models) == 1:
            return [error]
        log.warning("%s failed on a chunk of %d models (%s); inspecting them one at a time", inspector.name,
                    len(models), error_text(error))
    outcomes: list[InspectionResult | BaseException] = []
    for model, key in zip(models, keys):
        try:
            outcomes.extend(inspector.inspect_many([model], group.data, group.services, [key]))
        except Exception as error:
            outcomes.append(error)
    return outcomes


def scan_group(group: Group, batch_models: int, progress: ScanProgress) -> list[Verdict]:
    """Every scanner's verdict on every model of the group, ``batch_models`` models at a time; a model that fails
    to load or to be inspected is recorded as failed and the scan goes on."""
    verdicts: list[Verdict] = []
    for start in range(0, len(group.entries), batch_models):
        chunk = group.entries[start:start + batch_models]
        loaded: list[tuple[ModelEntry, nn.Module, str]] = []
        broken: dict[str, BaseException] = {}
        for entry in chunk:
            try:
                loaded.append((entry, *group.load(entry)))
            except Exception as error:
                broken[entry.name] = error
                log.warning("%s: cannot load the model (%s); recorded as failed", entry.name, error_text(error))
        for name, inspector in group.inspectors.items():
            outcomes = inspect_chunk(inspector, group, [m for _, m, _ in loaded], [k for _, _, k in loaded]) \
                if loaded else []
            by_name = {entry.name: (outcome, key) for (entry, _, key), outcome in zip(loaded, outcomes)}
            for entry in chunk:
                if entry.name in broken:
                    verdict = failed(entry, name, broken[entry.name])
                else:
                    outcome, key = by_name[entry.name]
                    verdict = failed(entry, name, outcome) if isinstance(outcome, BaseException) else \
                        verdict_of(entry, name, inspector, outcome,
                                   group.cache.reused.get((f"inspection/{inspector.name}", key)))
                verdicts.append(verdict)
                progress.update(verdict)
    return verdicts
