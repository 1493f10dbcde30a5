"""``python -m bdlab.bench grid <sweep dir or timings file> --workers 8,16,64``: a grid's makespan on N workers.

Replays the measured seconds of every artifact and cell of a grid (a finished grid's directory, whose
``results.json`` files hold them, or a timings file: :mod:`bdlab.sweeping.timings` gives the format) through
:mod:`bdlab.sweeping.simulate`: bdlab's former one-phase launch (cells in launch order, each model built by the
first cell that asks while the others that need it wait, holding their workers) and the two-phase plan (one
job per artifact first, longest chain first; then the cells, longest first). Each makespan is given as a ratio
to the lower bound ``max(total work / N, longest dependency chain)``, and the table is appended to
``benchmarks/grid.md`` (``--out``) with what dominates where two phases stay above 1.2x the bound. A last,
what-if column gives the same order as one queue without the barrier between the phases (each cell waiting
only for its own artifacts), which bdlab does not launch: the cost of the barrier.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from bdlab.errors import ConfigError
from bdlab.sweeping.simulate import Schedule, chain, lower_bound, one_phase, two_phase, without_barrier
from bdlab.sweeping.timings import GridTimings, load_timings

#: the two-phase ratio to the lower bound a grid should stay within (issue 26's goal at 8 workers)
GOAL = 1.2


def parse_workers(text: str) -> list[int]:
    """``8,16,64`` -> [8, 16, 64]; anything but integers >= 1 is one ConfigError line."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError("--workers", f"got {text!r}; give worker counts >= 1 separated by commas, e.g. 8,16,64")
    return counts


def longest_chain(timings: GridTimings) -> tuple[float, str]:
    """The longest dependency chain (seconds) and what it is made of."""
    memo: dict[str, float] = {}
    best, words = 0.0, ""
    for cell in timings.cells:
        top = max(cell.needs, key=lambda key: chain(key, timings.artifacts, memo), default=None)
        total = cell.seconds + (chain(top, timings.artifacts, memo) if top is not None else 0.0)
        if total > best:
            parts, key = [], top
            while key is not None:
                artifact = timings.artifacts[key]
                parts.append(f"{artifact.label} {artifact.seconds:.0f} s")
                key = max(artifact.needs, key=lambda k: chain(k, timings.artifacts, memo), default=None)
            best, words = total, " after ".join([f"cell {cell.name} {cell.seconds:.0f} s", *parts])
    return best, words


def dominates(timings: GridTimings, workers: int, schedule: Schedule, bound: float) -> str:
    """Why two phases stay above the goal: the artifact phase's span against its work, or the longest cell."""
    needed = {key for cell in timings.cells for key in cell.needs}
    artifact_work = sum(timings.artifacts[key].seconds for key in needed)
    longest = max((timings.artifacts[key] for key in needed), key=lambda a: a.seconds, default=None)
    cell = max(timings.cells, key=lambda c: c.seconds)
    idle = schedule.phase_one * workers - artifact_work
    reasons = []
    if longest is not None and schedule.phase_one > 0:
        reasons.append(f"phase 1 lasts {schedule.phase_one:.0f} s for {artifact_work:.0f} s of work: the longest "
                       f"artifact, {longest.label} ({longest.seconds:.0f} s), holds the cells back while "
                       f"{idle:.0f} worker-seconds idle")
    reasons.append(f"the longest cell is {cell.name} ({cell.seconds:.0f} s)")
    return f"{workers} workers, {schedule.makespan / bound:.2f}x: " + "; ".join(reasons)


def table(timings: GridTimings, counts: list[int]) -> tuple[str, list[str]]:
    """The markdown table (one row per worker count) and, where two phases miss the goal, what dominates."""
    lines = ["| workers | lower bound (s) | one phase (s) | vs bound | waiting on models, one phase (worker-s) | "
             "two phases (s) | vs bound | of which phase 1 (s) | what-if: no barrier (s) | vs bound |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for workers in counts:
        bound = lower_bound(timings, workers)
        before, after, overlap = one_phase(timings, workers), two_phase(timings, workers), \
            without_barrier(timings, workers)
        lines.append(f"| {workers} | {bound:.0f} | {before.makespan:.0f} | {before.makespan / bound:.2f} | "
                     f"{before.waited:.0f} | {after.makespan:.0f} | {after.makespan / bound:.2f} | "
                     f"{after.phase_one:.0f} | {overlap.makespan:.0f} | {overlap.makespan / bound:.2f} |")
        if after.makespan / bound > GOAL:
            notes.append(dominates(timings, workers, after, bound))
    return "\n".join(lines), notes


def report(source: Path, counts: list[int]) -> str:
    timings = load_timings(source)
    needed = {key for cell in timings.cells for key in cell.needs}
    work = sum(timings.artifacts[k].seconds for k in needed) + sum(c.seconds for c in timings.cells)
    seconds, words = longest_chain(timings)
    rows, notes = table(timings, counts)
    text = [f"{len(timings.cells)} cells, {len(needed)} artifacts, {work:.0f} s of work; the longest chain "
            f"{seconds:.0f} s ({words})", "", rows]
    if notes:
        text += ["", f"Above {GOAL}x the bound with two phases:", *(f"- {note}" for note in notes)]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bdlab.bench grid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a finished grid's directory (its results.json files) or a "
                                                   "timings file")
    parser.add_argument("--workers", default="8,16,64", help="worker counts, comma-separated (default 8,16,64)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks") / "grid.md",
                        help="markdown file the table is appended to (default benchmarks/grid.md)")
    args = parser.parse_args(argv)
    try:
        text = report(args.source, parse_workers(args.workers))
    except ConfigError as error:
        print(f"bdlab: invalid input: {error}", file=sys.stderr)
        return 2
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    with args.out.open("a") as stream:
        stream.write(f"\n`python -m bdlab.bench grid {args.source} --workers {args.workers}` ({stamp})\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
