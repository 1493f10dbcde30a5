"""Arrange records into attack x defense grids, one per setting, with mean and std over seeds.

A *setting* is a dataset / model pair plus any other config value the runs differ in; a
*row* is an attack plus the attack parameters its runs differ in (e.g. ``poison_rate``); a
*column* is a defense plus its differing parameters. Seeds are what a cell averages over.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from bdlab.reporting.collect import Record
from bdlab.reporting.residual import number, residual_values

# config keys that never tell two experiments apart: seeds (averaged over), paths, devices, display
_IGNORED_LEAVES = {"seed", "split_seed", "cache_dir", "root", "download", "system_dir", "enable_progress_bar",
                   "log_every_n_steps", "devices"}
_IGNORED_TOP = {"logger", "hydra", "data_dir", "cache_dir", "seed"}
_GROUPS = ("dataset", "model", "attack", "defense")
#: namespaces of the metrics that describe the attack (its trojaned model against the clean reference, its
#: poisoned inputs), not a defense: the same under every defense of a row, so the report shows them once per attack
ATTACK_NAMESPACES = ("clean", "trojan", "attack")


def is_attack_metric(key: str) -> bool:
    """Whether ``key`` is a figure of the attack (see :data:`ATTACK_NAMESPACES`), not of a defense."""
    return key.split("/", 1)[0] in ATTACK_NAMESPACES


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists and scalars kept as values (lists as tuples, hashable)."""
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tuple(node) if isinstance(node, list) else node}


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The config keys that can tell two experiments apart."""
    return {key: value for key, value in flatten(config).items()
            if key.split(".")[0] not in _IGNORED_TOP and key.split(".")[-1] not in _IGNORED_LEAVES
            and not key.split(".")[-1].startswith("_")}


def varying_keys(configs: list[dict[str, Any]]) -> list[str]:
    """Keys whose value (absence included) differs between the configs."""
    keys = sorted({key for config in configs for key in config})
    return [key for key in keys if len({repr(config.get(key)) for config in configs}) > 1]


def describe(name: str, config: dict[str, Any], keys: list[str], strip: str = "") -> str:
    """``name (key=value, ...)`` for the keys that vary, ``name`` alone when none do."""
    shown = [f"{key.removeprefix(strip)}={_show(config.get(key))}" for key in keys]
    return f"{name} ({', '.join(shown)})" if shown else name


def _show(value: Any) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, tuple) else str(value)


@dataclass
class Labelled:
    """A record with the labels of its setting, row and column, and the attack parameters that vary."""

    record: Record
    setting: str
    row: str
    column: str
    attack_params: dict[str, Any]


def label(records: list[Record]) -> list[Labelled]:
    """Give each record its setting, row and column labels (see the module docstring)."""
    configs = [comparable(r.config) for r in records]
    names = [{"dataset": r.dataset, "model": r.model, "attack": r.attack, "defense": r.defense} for r in records]
    other = varying_keys([{k: v for k, v in c.items() if k.split(".")[0] not in _GROUPS} for c in configs])
    within: dict[tuple[str, str], list[str]] = {}
    for group in _GROUPS:
        for name in {n[group] for n in names}:
            members = [c for c, n in zip(configs, names) if n[group] == name]
            within[group, name] = varying_keys([{k: v for k, v in c.items() if k.startswith(f"{group}.")}
                                                for c in members])
    labelled = []
    for record, config, name in zip(records, configs, names):
        setting_keys = within["dataset", name["dataset"]] + within["model", name["model"]] + other
        attack_keys = within["attack", name["attack"]]
        labelled.append(Labelled(
            record,
            describe(f"{name['dataset']} / {name['model']}", config, setting_keys),
            describe(name["attack"], config, attack_keys, strip="attack."),
            describe(name["defense"], config, within["defense", name["defense"]], strip="defense."),
            {key.removeprefix("attack."): config.get(key) for key in attack_keys}))
    return labelled


@dataclass
class Cell:
    """One attack x defense cell of one metric: the per-seed values and how many runs failed."""

    values: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    failed: int = 0
    runs: int = 0

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float | None:
        """Sample standard deviation over seeds; None for a single seed, which has no spread to show."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Grid:
    """All cells of one setting: ``cells[metric][(row, column)]``."""

    setting: str
    rows: list[str]
    columns: list[str]
    cells: dict[str, dict[tuple[str, str], Cell]]
    runs: dict[tuple[str, str], list[Record]]
    #: (metric, title) of the tables to draw, as the runs' methods declared them
    headline: list[tuple[str, str]] = field(default_factory=list)
    #: per column, the metric keys its runs declared
    declared_by: dict[str, set[str]] = field(default_factory=dict)
    #: ``attack_cells[metric][row]``: an attack-level metric over the row's seeds, each seed counted once
    attack_cells: dict[str, dict[str, Cell]] = field(default_factory=dict)

    def cell(self, metric: str, row: str, column: str) -> Cell:
        """The cell, empty when no run reported ``metric`` there."""
        return self.cells.get(metric, {}).get((row, column), Cell())

    def columns_of(self, metric: str) -> list[str]:
        """The columns whose defense declared ``metric``: a defense-specific table leaves out the others."""
        return [column for column in self.columns if metric in self.declared_by.get(column, set())]


def grids(labelled: list[Labelled]) -> list[Grid]:
    """One grid per setting, rows and columns sorted (``none`` first: the undefended baseline)."""
    by_setting: dict[str, list[Labelled]] = defaultdict(list)
    for item in labelled:
        by_setting[item.setting].append(item)
    result = []
    for setting in sorted(by_setting):
        items = by_setting[setting]
        rows = sorted({i.row for i in items}, key=_order)
        columns = sorted({i.column for i in items}, key=_order)
        cells: dict[str, dict[tuple[str, str], Cell]] = defaultdict(dict)
        runs: dict[tuple[str, str], list[Record]] = defaultdict(list)
        for item in items:
            runs[item.row, item.column].append(item.record)
        for (row, column), records in runs.items():
            for record in records:
                if not record.ok:
                    continue
                for metric, value in values_of(record).items():
                    cell = cells[metric].setdefault((row, column), Cell())
                    cell.values.append(value)
                    cell.seeds.append(record.seed)
            for metric_cells in cells.values():
                if (row, column) in metric_cells:
                    metric_cells[row, column].failed = sum(not r.ok for r in records)
                    metric_cells[row, column].runs = len(records)
        declared_by = {column: {key for key, _ in declared([i.record for i in items if i.column == column])}
                       for column in columns}
        result.append(Grid(setting, rows, columns, dict(cells), dict(runs), declared([i.record for i in items]),
                           declared_by, attack_cells(items)))
    return result


def values_of(record: Record) -> dict[str, float]:
    """A run's numeric metrics and its residual figures (:mod:`bdlab.reporting.residual`). NaN is how a run
    says a metric does not apply to it (e.g. MJS without a fixed trigger mask): left out, so it reads n/a."""
    values = {key: found for key, value in record.metrics.items() if (found := number(value)) is not None}
    return {**values, **residual_values(record)}


def attack_cells(items: list[Labelled]) -> dict[str, dict[str, Cell]]:
    """Each attack-level metric of each row over the row's seeds. Every defense of a row sees the same
    trojaned model, so a seed's runs give one value (their mean, should evaluation differ in the last digit)."""
    found: dict[tuple[str, str], dict[int | None, list[float]]] = defaultdict(lambda: defaultdict(list))
    for item in items:
        if item.record.ok:
            for metric, value in values_of(item.record).items():
                if is_attack_metric(metric):
                    found[metric, item.row][item.record.seed].append(value)
    cells: dict[str, dict[str, Cell]] = defaultdict(dict)
    for (metric, row), by_seed in found.items():
        cells[metric][row] = Cell([statistics.fmean(values) for values in by_seed.values()], list(by_seed))
    return dict(cells)


def declared(records: list[Record]) -> list[tuple[str, str]]:
    """The headline metrics the runs' attacks, defenses and analyses declared, in first-seen order;
    a results file written before runs declared them contributes its metric keys, titled by key. A key
    that categories title differently (``defense/asr``: under a reformation, of a sanitised model) gets
    all of its titles."""
    titles: dict[str, dict[str, None]] = {}
    for record in records:
        for key, title in record.headline or [(key, key) for key in sorted(record.metrics)]:
            titles.setdefault(key, {})[title] = None
    return [(key, " / ".join(named)) for key, named in titles.items()]


def _order(name: str) -> tuple[bool, str]:
    return (not name.startswith("none"), name)
