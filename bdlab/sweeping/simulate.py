"""Makespan of a grid on N workers, replayed from measured timings (:mod:`bdlab.sweeping.timings`).

Two launch plans:

- **one phase** (bdlab before the two-phase sweeper, ``hydra.sweeper.artifacts_first=false``): the cells go to
  the workers in launch order, each to the first free worker. A cell asks for what it needs in order; the first
  cell to ask for an artifact builds it on its own worker, and a cell that asks while another builds it waits
  for it, holding its worker (the artifact cache's file lock).
- **two phases** (the default): first one job per artifact, longest chain first (an artifact's seconds plus
  those of what it is built from; a job whose input is still being built waits for it, as on the lock), then,
  once every artifact job has finished, the cells, longest first.

Both are list scheduling (each job to the first free worker, in order). The lower bound of any schedule is
``max(total work / N, longest dependency chain)``: every artifact and every cell's own work done once, and no
cell finishing before the chain of artifacts it needs and its own work.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from bdlab.sweeping.timings import ArtifactTime, GridTimings

#: the order artifact kinds go in when their seconds are unknown: what others are built from first
KIND_ORDER = ("clean", "trojan", "autoencoder", "inspection")

Step = tuple[str, object]  # ("need", key) | ("build", key) | ("work", seconds)


@dataclass(frozen=True)
class Schedule:
    """A simulated launch: its makespan and, for two phases, when the artifact phase ended."""

    makespan: float
    phase_one: float = 0.0
    waited: float = 0.0  # worker-seconds spent holding a worker while another builds an artifact


def chain(key: str, artifacts: dict[str, ArtifactTime], memo: dict[str, float] | None = None) -> float:
    """Seconds from nothing to artifact ``key`` built: its own plus the longest chain of what it is built from."""
    memo = {} if memo is None else memo
    if key not in memo:
        artifact = artifacts[key]
        memo[key] = artifact.seconds + max((chain(d, artifacts, memo) for d in artifact.needs), default=0.0)
    return memo[key]


def lower_bound(timings: GridTimings, workers: int) -> float:
    """``max(total work / workers, longest chain)`` over the artifacts the cells need and the cells."""
    needed = _needed(timings)
    memo: dict[str, float] = {}
    work = sum(timings.artifacts[key].seconds for key in needed) + sum(cell.seconds for cell in timings.cells)
    longest = max(cell.seconds + max((chain(k, timings.artifacts, memo) for k in cell.needs), default=0.0)
                  for cell in timings.cells)
    return max(work / workers, longest)


def _needed(timings: GridTimings) -> set[str]:
    needed: set[str] = set()
    todo = [key for cell in timings.cells for key in cell.needs]
    while todo:
        key = todo.pop()
        if key not in needed:
            needed.add(key)
            todo.extend(timings.artifacts[key].needs)
    return needed


def list_schedule(jobs: Sequence[Sequence[Step]], workers: int, artifacts: dict[str, ArtifactTime],
                  start: float = 0.0, finished: dict[str, float] | None = None) -> tuple[float, float]:
    """Run ``jobs`` (each a list of steps) in order on ``workers`` workers from time ``start``; returns
    (the time the last job ends, worker-seconds spent waiting on artifacts). ``finished`` maps artifact keys
    to the time they are (or will be) built, and is updated: a ``need`` of a key not in it builds it there
    (after what it is built from), a ``need`` of a key being built waits for it, a ``build`` builds it unless
    another job has started it."""
    if workers < 1:
        raise ValueError("workers must be >= 1")
    finished = {} if finished is None else finished
    queue = list(range(len(jobs)))[::-1]
    events: list[tuple[float, int, tuple[Step, ...]]] = []
    sequence = 0
    end, waited = start, 0.0

    def dispatch(time: float) -> None:
        nonlocal sequence
        if queue:
            sequence += 1
            heapq.heappush(events, (time, sequence, tuple(jobs[queue.pop()])))

    for _ in range(min(workers, len(jobs))):
        dispatch(start)
    while events:
        time, _, steps = heapq.heappop(events)
        if not steps:
            end = max(end, time)
            dispatch(time)
            continue
        (action, value), rest = steps[0], steps[1:]
        if action == "work":
            resume = time + float(value)  # type: ignore[arg-type]
        elif str(value) in finished:  # built or being built: wait until it is there
            resume = max(time, finished[str(value)])
            waited += resume - time
        else:
            key = str(value)
            pending = [dep for dep in artifacts[key].needs if finished.get(dep, float("inf")) > time]
            if pending:  # what it is built from first (built here, or waited for), then this
                resume, rest = time, (*(("need", dep) for dep in pending), ("build", key), *rest)
            else:
                finished[key] = resume = time + artifacts[key].seconds
        sequence += 1
        heapq.heappush(events, (resume, sequence, rest))
    return end, waited


def one_phase(timings: GridTimings, workers: int) -> Schedule:
    """Today's launch: cells in launch order, artifacts built by the first cell that asks."""
    jobs = [[*(("need", key) for key in cell.needs), ("work", cell.seconds)] for cell in timings.cells]
    end, waited = list_schedule(jobs, workers, timings.artifacts)
    return Schedule(end, waited=waited)


def artifact_order(keys: Sequence[str], artifacts: dict[str, ArtifactTime],
                   unknown: Collection[str] = ()) -> list[str]:
    """Phase 1's launch order: longest chain first; the ``unknown`` ones (no measured time) after them, in
    ``KIND_ORDER`` (what others are built from first), each group in the given order."""
    memo: dict[str, float] = {}

    def rank(item: tuple[int, str]) -> tuple[int, float, int, int]:
        index, key = item
        kind = KIND_ORDER.index(artifacts[key].kind) if artifacts[key].kind in KIND_ORDER else len(KIND_ORDER)
        if key in unknown:
            return (1, 0.0, kind, index)
        return (0, -chain(key, artifacts, memo), kind, index)

    return [key for _, key in sorted(enumerate(keys), key=rank)]


def two_phase(timings: GridTimings, workers: int) -> Schedule:
    """Artifact jobs first (longest chain first), then, after the last of them, the cells longest first."""
    order = artifact_order([key for key in timings.artifacts if key in _needed(timings)], timings.artifacts)
    finished: dict[str, float] = {}
    phase_one, waited = list_schedule([[("build", key)] for key in order], workers, timings.artifacts,
                                      finished=finished)
    cells = sorted(timings.cells, key=lambda cell: -cell.seconds)
    end, more = list_schedule([[("work", cell.seconds)] for cell in cells], workers, timings.artifacts,
                              start=phase_one, finished=finished)
    return Schedule(end, phase_one, waited + more)


def without_barrier(timings: GridTimings, workers: int) -> Schedule:
    """A what-if, not a launch bdlab makes: the two-phase order as one queue, artifact jobs first, then the cells
    longest first, each cell waiting (on its worker) only for the artifacts it needs."""
    order = artifact_order([key for key in timings.artifacts if key in _needed(timings)], timings.artifacts)
    cells = sorted(timings.cells, key=lambda cell: -cell.seconds)
    jobs = [[("build", key)] for key in order] + \
        [[*(("need", key) for key in cell.needs), ("work", cell.seconds)] for cell in cells]
    end, waited = list_schedule(jobs, workers, timings.artifacts)
    return Schedule(end, waited=waited)
