"""The two-phase grid sweeper: one ``-m`` command builds the artifacts the cells share first, then runs the cells.

Hydra's basic sweeper hands every cell straight to the launcher, so parallel cells of one row wait on the cache
lock while one of them trains the row's model. :class:`TwoPhaseSweeper` (Hydra's ``BasicSweeper`` with two
launches; Hydra's plugin ``hydra_plugins.bdlab_grid.GridSweeper``, the ``hydra/sweeper: bdlab`` option that
``conf/config.yaml`` selects) expands the same cells, derives what each needs without training
(:mod:`bdlab.sweeping.plan`), and then:

1. launches one job per distinct artifact the cache lacks, through the configured launcher (basic, joblib,
   submitit), longest first when earlier timings say how long they take (:func:`bdlab.sweeping.jobs.build_artifact`;
   directories ``<sweep dir>/artifacts/<n>``);
2. launches the cells (longest first when earlier timings say, in their grid-numbered directories), which find
   everything cached; a cell whose artifact job failed records that job's error as its own failure.

Settings (``hydra.sweeper.*``): ``artifacts_first`` (default true; false launches as the basic sweeper does),
``timings`` (default null: the ``results.json`` files of earlier grids beside this one, i.e. under the sweep
directory's parent; or a sweep directory or timings file, :mod:`bdlab.sweeping.timings`), plus the basic
sweeper's ``max_batch_size`` and ``params`` (defaults in ``conf/hydra/sweeper/bdlab.yaml``). ``+dry_run=true``
prints the cells, the artifacts to build and those already cached, and the estimated time of each phase, and
launches nothing. A grid run again into its own directory (``hydra.sweep.dir``) keeps the cells that finished.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from omegaconf import DictConfig, OmegaConf

from bdlab.sweeping.callback import DRY_RUN_KEY

# bdlab's planning modules import torch: they load when a grid is planned, not when Hydra scans its plugins
if TYPE_CHECKING:
    from bdlab.sweeping.plan import Artifact, Cell, GridPlan
    from bdlab.sweeping.timings import Estimates, GridTimings

log = logging.getLogger("bdlab")

ARTIFACT_DIR = "artifacts"
#: the cell subdirectory Hydra numbers by launch position; cells launched out of grid order keep grid numbers
DEFAULT_SUBDIR = "${hydra.job.num}"


def launcher_workers(launcher: DictConfig) -> int | None:
    """How many jobs the launcher runs at once: 1 (basic), joblib's ``n_jobs``; None where the cluster decides."""
    target = str(launcher.get("_target_", ""))
    if target.endswith("BasicLauncher"):
        return 1
    if "joblib" in target.lower():
        jobs = int(launcher.get("n_jobs", 1) or 1)
        return jobs if jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + jobs)  # joblib's -1 = every core
    return None


def phase_seconds(seconds: Sequence[float], workers: int | None) -> str:
    """``N s of work`` and, given the workers, the list-scheduled span of those jobs (longest first)."""
    work = sum(seconds)
    if not seconds:
        return "nothing to run"
    if workers is None:
        return f"{work:.0f} s of work, the longest job {max(seconds):.0f} s"
    from bdlab.sweeping.simulate import list_schedule

    span, _ = list_schedule([[("work", s)] for s in sorted(seconds, reverse=True)], workers, {})
    return f"{work:.0f} s of work, about {span:.0f} s on {workers} worker{'s' if workers > 1 else ''}"


class TwoPhaseSweeper(BasicSweeper):
    """Hydra's basic sweeper, launching a grid's shared artifacts before its cells (module docstring).

    Args:
        max_batch_size: cells per launch (Hydra's; default null: all at once).
        params: the grid's axes (Hydra's ``hydra.sweeper.params``).
        artifacts_first: two phases (default true); false launches the cells alone, as the basic sweeper does.
        timings: earlier timings for estimates and longest-first order (default null: the grids beside this one).
    """

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None,
                 artifacts_first: bool = True, timings: str | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.artifacts_first, self.timings = artifacts_first, timings
        self.cell_task: Any = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        from bdlab.sweeping.jobs import GridCell

        self.hydra_context, self.config = hydra_context, config
        self.cell_task = GridCell(task_function)
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=self.cell_task, config=config)

    # ---- the grid
    def cells(self, arguments: Sequence[str]) -> list[list[str]]:
        """Every cell's overrides in Hydra's launch order (the basic sweeper's expansion, unbatched)."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        return [list(cell) for cell in self.split_arguments(overrides, None)[0]]

    def compose(self, overrides: list[str]) -> DictConfig:
        return self.hydra_context.config_loader.load_sweep_config(self.config, overrides)

    def earlier_timings(self) -> tuple[GridTimings, str]:
        """Timings of earlier runs (``timings`` or the grids beside this one) and where they came from."""
        from bdlab.sweeping.timings import from_results, load_timings, results_files

        if self.timings:
            return load_timings(Path(str(self.timings)).expanduser()), str(self.timings)
        beside = Path(str(self.config.hydra.sweep.dir)).parent
        paths = results_files(beside) if beside.is_dir() else []
        return from_results(paths), f"{len(paths)} earlier results.json under {beside}"

    def sweep(self, arguments: list[str]) -> Any:
        from bdlab.errors import ConfigError
        from bdlab.sweeping.plan import override_key, plan_grid
        from bdlab.sweeping.timings import Estimates

        dry_run = bool(self.config.get(DRY_RUN_KEY, False))
        arguments = [a for a in arguments if override_key(a) != DRY_RUN_KEY]  # the sweeper's, not the cells'
        if not dry_run and not self.artifacts_first:
            return super().sweep(arguments)
        started = time.perf_counter()
        try:
            timings, source = self.earlier_timings()
        except ConfigError as error:  # a timings path that is not one: one line, before any work
            print(f"bdlab: invalid config: hydra.sweeper.timings: {error}", file=sys.stderr)
            sys.exit(2)
        plan = plan_grid(self.compose, self.cells(arguments))
        estimates = Estimates(timings)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        done = self.finished_cells(plan, sweep_dir)
        if dry_run:
            print(dry_run_report(plan, estimates, source, launcher_workers(self.config.hydra.launcher),
                                 self.artifacts_first, time.perf_counter() - started, done))
            return []
        for cell in plan.cells:
            if cell.problem is not None:  # a cell Hydra cannot compose stops the grid before any job, as before
                self.validate_batch_is_legal([cell.overrides])
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        if done:
            print(f"bdlab: resuming {sweep_dir}: {len(done)} of its {len(plan.cells)} cells finished before and are "
                  "kept", flush=True)
        pending = [cell for cell in plan.cells if cell.index not in done]
        failed = self.build_artifacts(plan, pending, estimates, sweep_dir)
        return self.run_cells(plan, pending, estimates, failed)

    def grid_numbered(self) -> bool:
        """Whether cell directories are the default ``<sweep dir>/<job number>`` (then cells keep their grid
        numbers however they are launched, and a finished one is found again)."""
        return OmegaConf.to_container(self.config.hydra.sweep, resolve=False).get("subdir") == DEFAULT_SUBDIR

    def finished_cells(self, plan: GridPlan, sweep_dir: Path) -> set[int]:
        """The cells an earlier run of this grid into ``sweep_dir`` finished (``status: ok``, same overrides)."""
        from bdlab.sweeping.timings import job_overrides

        if not self.grid_numbered() or not sweep_dir.is_dir():
            return set()
        return {cell.index for cell in plan.cells
                if _status(results := sweep_dir / str(cell.index) / "results.json") == "ok"
                and list(job_overrides(results)) == cell.overrides}

    # ---- phase 1
    def build_artifacts(self, plan: GridPlan, pending: list[Cell], estimates: Estimates,
                        sweep_dir: Path) -> dict[str, tuple[Path, str]]:
        """Launch one job per artifact the ``pending`` cells need and the cache lacks; returns the failed ones:
        key -> (its results.json, its label)."""
        from bdlab.sweeping.jobs import BUILD_KEY, build_artifact
        from bdlab.sweeping.simulate import artifact_order
        from bdlab.sweeping.timings import ArtifactTime

        needed = {key for cell in pending for key in cell.needs}
        missing = [artifact for artifact in plan.missing() if artifact.key in needed]
        if not missing:
            return {}
        known = {a.key: ArtifactTime(a.kind, a.label, estimates.artifact(a.key, a.label) or 0.0, a.needs)
                 for a in missing}
        for key in {need for a in missing for need in a.needs} - set(known):  # cached inputs cost nothing
            known[key] = ArtifactTime(plan.artifacts[key].kind, plan.artifacts[key].label, 0.0)
        unknown = {a.key for a in missing if estimates.artifact(a.key, a.label) is None}
        order = artifact_order([a.key for a in missing], known, unknown)
        # numbered after the jobs of earlier runs into this directory, whose records stay
        first = 1 + max((int(p.name) for p in (sweep_dir / ARTIFACT_DIR).glob("*") if p.name.isdigit()), default=-1)
        numbers = {key: first + n for n, key in enumerate(order)}
        jobs = [[*plan.first_cell(key, pending).overrides, f"+{BUILD_KEY}={plan.artifacts[key].kind}",
                 f"hydra.sweep.subdir={ARTIFACT_DIR}/{numbers[key]}"] for key in order]
        print(f"bdlab: phase 1 of 2: {len(jobs)} artifact job(s) before the {len(pending)} cells "
              f"({describe(plan.artifacts[key] for key in order)})", flush=True)
        launcher = Plugins.instance().instantiate_launcher(hydra_context=self.hydra_context,
                                                           task_function=build_artifact, config=self.config)
        try:
            launcher.launch(jobs, initial_job_idx=0)
        except Exception as error:  # a launcher that lost jobs (a cluster job killed): each job's file says
            log.error("bdlab: the artifact jobs' launch raised %s: %s", type(error).__name__, error)
        failed: dict[str, tuple[Path, str]] = {}
        for key, number in numbers.items():
            results = sweep_dir / ARTIFACT_DIR / str(number) / "results.json"
            if _status(results) != "ok":
                failed[key] = (results, plan.artifacts[key].label)
        if failed:
            print(f"bdlab: {len(failed)} artifact job(s) failed; the cells that need them are recorded as failed: "
                  + "; ".join(f"{label} ({path.parent})" for path, label in failed.values()), file=sys.stderr)
        return failed

    # ---- phase 2
    def run_cells(self, plan: GridPlan, pending: list[Cell], estimates: Estimates,
                  failed: dict[str, tuple[Path, str]]) -> Any:
        """Launch the ``pending`` cells (longest first where earlier timings allow), ``max_batch_size`` at a time;
        in their grid-numbered directories whenever that is not their launch position."""
        seconds = {cell.index: estimates.cell(cell.overrides, cell.name) for cell in pending}
        order = list(pending)
        if self.grid_numbered() and any(s is not None for s in seconds.values()):
            order.sort(key=lambda cell: (seconds[cell.index] is None, -(seconds[cell.index] or 0.0), cell.index))
        renumber = [cell.index for cell in order] != list(range(len(order)))
        jobs = []
        for position, cell in enumerate(order):
            broken = next((failed[key] for key in cell.needs if key in failed), None)
            if broken is not None:
                self.cell_task.failed[position] = broken
            jobs.append([*cell.overrides, *([f"hydra.sweep.subdir={cell.index}"] if renumber else [])])
        if not jobs:
            return []
        print(f"bdlab: phase 2 of 2: {len(jobs)} cells" + (" longest first" if order != pending else "")
              + (f", {len(self.cell_task.failed)} of them recorded as failed" if self.cell_task.failed else ""),
              flush=True)
        returns: list[Sequence[JobReturn]] = []
        size = self.max_batch_size or len(jobs)
        for first in range(0, len(jobs), size):
            results = self.launcher.launch(jobs[first:first + size], initial_job_idx=first)
            for result in results:
                _ = result.return_value  # re-raises a job's exception, as the basic sweeper does
            returns.append(results)
        return returns


def _status(results: Path) -> str | None:
    import json

    try:
        return json.loads(results.read_text()).get("status")
    except (OSError, ValueError):
        return None


KIND_WORDS = {"clean": ("clean model", "clean models"), "trojan": ("trojaned model", "trojaned models"),
              "inspection": ("inspection of the clean model", "inspections of the clean model"),
              "autoencoder": ("autoencoder", "autoencoders")}


def describe(artifacts: Any) -> str:
    """``1 clean model, 16 trojaned models, ...`` (kinds in the planner's order)."""
    counts: dict[str, int] = {}
    for artifact in artifacts:
        counts[artifact.kind] = counts.get(artifact.kind, 0) + 1
    words = [f"{n} {KIND_WORDS.get(kind, (kind, kind))[n != 1]}" for kind, n in counts.items()]
    return ", ".join(words) or "none"


def dry_run_report(plan: GridPlan, estimates: Estimates, source: str, workers: int | None, artifacts_first: bool,
                   seconds: float, done: Collection[int] = (), listed: int = 40) -> str:
    """What ``+dry_run=true`` prints: cells, artifacts (to build, cached, unknown), estimated time per phase;
    ``done`` are cells an earlier run into the same directory finished (a resumed grid keeps them)."""
    pending = [cell for cell in plan.cells if cell.index not in done]
    needed = {key for cell in pending for key in cell.needs}
    artifacts = list(plan.artifacts.values())
    cached = [a for a in artifacts if a.cached() is True]
    missing = [a for a in plan.missing() if a.key in needed]
    keyed_by_data = [a for a in missing if a.cached() is None]
    lines = [f"bdlab: dry run (nothing launched, nothing written): {len(plan.cells)} cells, planned in {seconds:.1f} s",
             *([f"  {len(done)} of them finished in an earlier run into this directory: kept, not run again"]
               if done else []),
             f"artifacts the cells need: {len(artifacts)} distinct ({describe(artifacts)})",
             f"  already cached: {len(cached)}" + (f" ({describe(cached)})" if cached else ""),
             f"  to build first, one job each: {len(missing)}" + (f" ({describe(missing)})" if missing else "")]
    if keyed_by_data:
        lines.append(f"  ({len(keyed_by_data)} of these are keyed by the loaded images, which a dry run does not load: "
                     "a job that finds its artifact cached ends in seconds)")
    problems = [cell for cell in plan.cells if cell.problem]
    if problems:
        lines.append(f"  {len(problems)} cell(s) whose needs could not be derived run as they are, e.g. cell "
                     f"{problems[0].index}: {problems[0].problem}")
    for artifact in missing[:listed]:
        estimate = estimates.artifact(artifact.key, artifact.label)
        lines.append(f"    [{artifact.kind}] {artifact.label}" + (f"  ~{estimate:.0f} s" if estimate is not None else ""))
    if len(missing) > listed:
        lines.append(f"    ... and {len(missing) - listed} more")
    lines.append(_estimate_lines(pending, missing, estimates, source, workers, artifacts_first))
    return "\n".join(lines)


def _estimate_lines(pending: list[Cell], missing: list[Artifact], estimates: Estimates, source: str,
                    workers: int | None, artifacts_first: bool) -> str:
    if not estimates.runs and not estimates.artifacts:
        return (f"estimated time: no earlier timings ({source}); give hydra.sweeper.timings=<a finished grid's "
                "directory or a timings file>")
    artifact_s = [s for a in missing if (s := estimates.artifact(a.key, a.label)) is not None]
    cell_s = [s for c in pending if (s := estimates.cell(c.overrides, c.name)) is not None]
    lines = [f"estimated time (from {source}):"]
    if artifacts_first:
        lines.append(f"  phase 1, artifacts: {len(missing)} job(s), {len(artifact_s)} with a time: "
                     f"{phase_seconds(artifact_s, workers)}")
    else:
        lines.append("  hydra.sweeper.artifacts_first=false: the cells build what they need as they ask for it")
    lines.append(f"  phase 2, cells: {len(pending)}, {len(cell_s)} with a time: {phase_seconds(cell_s, workers)}")
    return "\n".join(lines)
