"""Training progress for a log file: one line per epoch where Lightning's bar would rewrite one line with
carriage returns (output that is not a terminal: a sweep's job log, a batch job, a pipe)."""

from __future__ import annotations

import logging
import sys
import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from bdlab.results import show_value

log = logging.getLogger(__name__)


def is_terminal() -> bool:
    """Whether standard output (where Lightning's bar writes) is a terminal."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


class EpochLog(Callback):
    """Logs ``epoch 2/5: <the bar's metrics> (3.1 s)`` once per epoch, from the main process only.

    Lightning calls a callback's ``on_train_epoch_end`` before the module's own, where the epoch's metrics
    are logged, so an epoch's line is written when the next one starts, or when training ends.
    """

    def __init__(self) -> None:
        self.started = 0.0
        self.finished: tuple[int, float] | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.finished = (trainer.current_epoch, time.perf_counter() - self.started)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer)

    def _write(self, trainer: pl.Trainer) -> None:
        if self.finished is None or not trainer.is_global_zero:
            return
        (epoch, seconds), self.finished = self.finished, None
        shown = ", ".join(f"{key} {show_value(float(value))}" for key, value in trainer.progress_bar_metrics.items())
        log.info("epoch %d/%d: %s (%.1f s)", epoch + 1, trainer.max_epochs, shown or "no metrics logged", seconds)
