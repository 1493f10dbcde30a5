"""A scan's progress: models scanned of the total and the time left, as a bar on a terminal (tqdm, the library
Lightning's own bar uses) and as one log line per model scan otherwise (a job log, a pipe)."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

from bdlab.scanning.population import Verdict
from bdlab.training.progress import is_terminal

log = logging.getLogger("bdlab")


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 20 s``, ``2 h 05 min``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def outcome(verdict: Verdict) -> str:
    """A verdict in a few words: the flagged classes and the largest AIV, or why the scan failed."""
    if not verdict.ok:
        return f"failed ({verdict.error})"
    flagged = ",".join(map(str, verdict.flagged_classes)) or "none"
    return f"flagged {flagged}, aiv_max {verdict.aiv_max:.2f}{' (cached)' if verdict.cached else ''}"


class ScanProgress:
    """Counts model scans (one model by one scanner) done of ``total``; the time left extrapolates the mean so far."""

    def __init__(self, total: int, terminal: bool | None = None) -> None:
        self.total, self.done, self.started = total, 0, time.perf_counter()
        terminal = is_terminal() if terminal is None else terminal
        self.bar = tqdm(total=total, unit="model", desc="scan", file=sys.stdout, dynamic_ncols=True) \
            if terminal else None

    def left(self) -> float:
        """Seconds left at the pace so far."""
        return (time.perf_counter() - self.started) / max(self.done, 1) * (self.total - self.done)

    def update(self, verdict: Verdict) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{verdict.scanner} {verdict.name}: {outcome(verdict)}", refresh=False)
            self.bar.update(1)
            return
        log.info("scan %d/%d: %s by %s: %s (%.1f s; %s left)", self.done, self.total, verdict.name, verdict.scanner,
                 outcome(verdict), verdict.seconds if verdict.ok else 0.0, duration(self.left()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
