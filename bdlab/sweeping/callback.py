"""The Hydra callbacks of grids: every ``-m`` grid is summarised at the end; a sweep file's is also refused
up front when it is bad.

After the last job of any grid (``conf/config.yaml`` registers :class:`GridSummary`), one summary: artifact
jobs and cells done and failed, models trained and reused, and the report command. A sweep file's grid (``+sweep=``,
:class:`SweepCallback`, registered by ``conf/sweep/_base.yaml`` in its place) is checked before any job
starts: each config-group option it names must exist and every axis must hold at least one value; a
problem is one line on stderr and exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from bdlab.compose import CONFIG_DIR
from bdlab.plugins import group_options, plugin_names
from bdlab.results import RESULTS_FILE

#: ``+dry_run=true``: the grid sweeper (bdlab.sweeping.sweeper) plans and launches nothing
DRY_RUN_KEY = "dry_run"
#: the ``job`` of a results.json written by an artifact job of a two-phase grid (bdlab.sweeping.jobs)
ARTIFACT_JOB = "artifact"


def options(group: str, searchpath: Any = ()) -> list[str]:
    """The options of a config group under ``conf/``, the ``BDLAB_PLUGINS`` packages' and ``searchpath``'s (a
    config's ``hydra.searchpath``), less sweep files' own helpers (they start with ``_``)."""
    if not searchpath and not plugin_names():
        return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))
    return [name for name in group_options(group, searchpath) or [] if not name.rpartition("/")[2].startswith("_")]


def grid_overrides(config: DictConfig) -> list[str]:
    """The grid as override strings: the sweep file's ``hydra.sweeper.params``, then the command line."""
    params = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params else {}
    return [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)


def grid_problems(config: DictConfig) -> list[str]:
    """One line per problem with the grid: unknown options, empty axes, no axis at all."""
    sweep = config.hydra.runtime.choices.get("sweep")
    params = config.hydra.sweeper.get("params")
    problems = []
    if sweep is not None and not params:
        problems.append(f"sweep '{sweep}' defines an empty grid: give hydra.sweeper.params at least one axis")
    try:
        overrides = OverridesParser.create().parse_overrides(grid_overrides(config))
    except HydraException as error:
        return [*problems, f"cannot parse the grid: {str(error).splitlines()[0]}"]
    searchpath = list(config.hydra.get("searchpath") or [])  # hydra.searchpath=[pkg://...] adds options too
    for override in overrides:
        key = override.key_or_group
        group = key.lstrip("+~")
        # a glob (glob(*,exclude=none)) picks among the group's options, as Hydra's sweeper expands it
        values = override.value().filter(options(group, searchpath)) if isinstance(override.value(), Glob) else \
            list(override.sweep_string_iterator()) if override.is_sweep_override() else \
            [override.get_value_element_as_str()]
        if not values:
            problems.append(f"the grid axis '{key}' has no values")
        if key.startswith("hydra") or override.is_delete():
            continue
        known = options(group, searchpath)
        if not known and not (CONFIG_DIR / group).is_dir():  # a field (attack.poison_rate), not a group
            continue
        for value in values:
            if value not in known:
                problems.append(f"unknown {group} option '{value}' (available: {', '.join(known)})")
    return problems


def launch_order(path: Path) -> tuple[tuple[int, int, str], ...]:
    """A sort key of job files by directory, numbers as numbers (``artifacts/10`` after ``artifacts/9``)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in path.parent.parts)


def sweep_summary(sweep_dir: Path) -> str:
    """Cells by status, artifact jobs (a two-phase grid's; the latest per artifact where a resumed grid ran one
    again) and models trained vs reused, from the jobs' results.json files."""
    statuses: dict[str, int] = {}
    latest: dict[str, str] = {}
    built: dict[str, set[str]] = {}
    reused: set[str] = set()
    for path in sorted(sweep_dir.rglob(RESULTS_FILE), key=launch_order):
        try:
            results: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            statuses["unreadable"] = statuses.get("unreadable", 0) + 1
            continue
        status = results.get("status", "?")
        if results.get("job") == ARTIFACT_JOB:
            latest[str((results.get("artifact") or {}).get("key", path))] = status
        else:
            statuses[status] = statuses.get(status, 0) + 1
        for name, artifact in (results.get("artifacts") or {}).items():
            if artifact.get("reused"):
                reused.add(artifact["path"])
            else:
                built.setdefault(name.removesuffix("_model"), set()).add(artifact["path"])
    jobs: dict[str, int] = {}
    for status in latest.values():
        jobs[status] = jobs.get(status, 0) + 1
    cells = ", ".join(f"{count} {status}" for status, count in sorted(statuses.items())) or "no results"
    phase = f"artifact jobs {', '.join(f'{n} {status}' for status, n in sorted(jobs.items()))}; " if jobs else ""
    trained = sum(len(paths) for paths in built.values())
    kinds = " + ".join(f"{len(paths)} {kind}" for kind, paths in sorted(built.items()))
    return (f"sweep {sweep_dir}: cells {cells}; {phase}trained {trained} models ({kinds or 'none'}), "
            f"reused {len(reused - set().union(*built.values()))} cached; "
            f"report: python -m bdlab.report {sweep_dir}")


class GridSummary(Callback):
    """Registered by ``conf/config.yaml`` under ``hydra.callbacks``: a plain ``-m`` grid ends with the same
    summary and report command as a sweep file's (a dry run, which ran nothing, with none)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get(DRY_RUN_KEY) is not None:
            print(f"bdlab: +{DRY_RUN_KEY}=true counts the work of a grid: give -m (python -m bdlab.run -m ... "
                  f"+{DRY_RUN_KEY}=true)", file=sys.stderr)
            sys.exit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get(DRY_RUN_KEY, False):
            print(sweep_summary(Path(config.hydra.sweep.dir)))


class SweepCallback(GridSummary):
    """Registered by ``conf/sweep/_base.yaml`` under ``hydra.callbacks``, in :class:`GridSummary`'s place."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        super().on_run_start(config, **kwargs)
        sweep = config.hydra.runtime.choices.get("sweep")
        print(f"bdlab: +sweep={sweep} is a grid: run it with -m (python -m bdlab.run -m +sweep={sweep})",
              file=sys.stderr)
        sys.exit(2)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problems = grid_problems(config)
        for problem in problems:
            print(f"bdlab: invalid sweep: {problem}", file=sys.stderr)
        if problems:
            sys.exit(2)
