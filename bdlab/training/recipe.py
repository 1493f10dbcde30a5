"""The run's training recipe, validated once before anything is loaded, trained or written."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger
from torch import nn

from bdlab.errors import ConfigError, build
from bdlab.training.progress import EpochLog, is_terminal

# Lightning's accepted `precision` values (https://lightning.ai/docs/pytorch/stable/common/trainer.html#precision)
PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true", "bf16-mixed",
              "32-true", "64-true", "64", "32", "16", "bf16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def as_int(field: str, value: Any) -> int:
    """``value`` as an int, or one ConfigError line saying it is not one (bools and fractions refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(field, f"got {value!r}, must be an integer")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(field, f"got {value!r}, must be an integer") from None
    if not number.is_integer():
        raise ConfigError(field, f"got {value!r}, must be an integer")
    return int(number)


def check_devices(devices: Any) -> None:
    """Lightning's ``devices``: ``auto``, a count >= 1, -1 (all), or a list of device indices."""
    if devices == "auto" or devices == -1 or devices == "-1":
        return
    if isinstance(devices, (list, tuple)):
        if devices and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices):
            return
    elif isinstance(devices, str) and all(part.strip().isdigit() for part in devices.split(",") if part.strip()):
        if devices.strip():
            return
    elif isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        return
    raise ConfigError("trainer.devices", f"got {devices!r}, must be auto, a count >= 1, -1 (all) or a list of device "
                      "indices")


def check_trainer(trainer: dict[str, Any]) -> None:
    """Refuse Lightning Trainer arguments that would train forever, not at all, or end in a traceback."""
    epochs = trainer.get("max_epochs")
    if epochs is None or as_int("trainer.max_epochs", epochs) < 1:
        raise ConfigError("trainer.max_epochs", f"got {epochs!r}, must be >= 1 (Lightning reads -1 as 'no limit' and "
                          "0 trains nothing)")
    precision = trainer.get("precision", "32-true")
    if str(precision) not in PRECISIONS:
        raise ConfigError("trainer.precision", f"got {precision!r}, must be one of {', '.join(PRECISIONS)}")
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in ACCELERATORS:
        raise ConfigError("trainer.accelerator", f"got {accelerator!r}, must be one of {', '.join(ACCELERATORS)}")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator", f"{accelerator} asked for, but no CUDA device is visible; use "
                          "trainer=cpu or trainer.accelerator=auto")
    check_devices(trainer.get("devices", "auto"))
    if as_int("trainer.num_nodes", trainer.get("num_nodes", 1)) < 1:
        raise ConfigError("trainer.num_nodes", f"got {trainer.get('num_nodes')!r}, must be >= 1")
    try:  # Lightning's own checks of every other argument (strategy, gradient accumulation, ...)
        pl.Trainer(**{**trainer, "logger": False, "enable_checkpointing": False, "enable_model_summary": False,
                      "enable_progress_bar": False})
    except Exception as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError("trainer", f"Lightning refuses these Trainer arguments: {message}") from None


def check_optimizer(cfg: DictConfig) -> tuple[OptimizerFactory, SchedulerFactory | None]:
    """Instantiate the optimizer and scheduler on a dummy parameter, so bad values fail now, in one line."""
    lr = cfg.optimizer.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ConfigError("optimizer.lr", f"got {lr!r}, must be a number > 0 (it defaults to model.lr)")
    try:
        optimizer_factory = build(cfg.optimizer)
        optimizer = optimizer_factory([nn.Parameter(torch.zeros(1))])
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError("optimizer", f"cannot be built ({str(error).splitlines()[0] if str(error) else error!r}); "
                          "check its _target_ and arguments") from None
    if not cfg.get("scheduler"):
        return optimizer_factory, None
    try:
        scheduler_factory = build(cfg.scheduler)
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": nothing is trained here
            warnings.simplefilter("ignore")
            scheduler_factory(optimizer).step()  # some arguments are only used (and refused) at a step
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError("scheduler", f"cannot be built ({str(error).splitlines()[0] if str(error) else error!r}); "
                          "check its _target_ and arguments, or set scheduler=null") from None
    return optimizer_factory, scheduler_factory


@dataclass(frozen=True)
class TrainingRecipe:
    """How every model of a run is trained: epochs, batch size, optimizer, scheduler, seed and the
    Lightning Trainer arguments (``trainer`` group). :meth:`from_config` validates all of it.

    Defaults live in the config (``conf/config.yaml``, ``conf/trainer/default.yaml`` and the
    model option): SGD with momentum 0.9 and weight decay 5e-4, cosine schedule, 5 epochs. The
    scheduler steps per ``interval`` (``epoch``; a helper's own recipe may step it per ``step``).
    """

    seed: int
    batch_size: int
    max_epochs: int
    optimizer: OptimizerFactory
    scheduler: SchedulerFactory | None
    trainer: dict[str, Any]
    interval: str = "epoch"

    @classmethod
    def from_config(cls, cfg: DictConfig) -> TrainingRecipe:
        seed = as_int("seed", cfg.get("seed"))
        try:
            trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
        except Exception as error:
            raise ConfigError("trainer", f"cannot be resolved ({error})") from None
        check_trainer(trainer)
        batch_size = as_int("model.batch_size", cfg.model.get("batch_size"))
        if batch_size < 1:
            raise ConfigError("model.batch_size", f"got {batch_size}, must be >= 1")
        optimizer, scheduler = check_optimizer(cfg)
        return cls(seed, batch_size, as_int("trainer.max_epochs", trainer["max_epochs"]), optimizer, scheduler,
                   trainer)

    def variant(self, max_epochs: int, lr: float) -> TrainingRecipe:
        """The same recipe for ``max_epochs`` epochs at learning rate ``lr`` (a fine-tuning of a trained
        model); a schedule over the epochs (``T_max``) follows the new count."""
        optimizer = functools.partial(self.optimizer.func, *self.optimizer.args,
                                      **{**self.optimizer.keywords, "lr": lr})
        scheduler = self.scheduler
        if isinstance(scheduler, functools.partial) and "T_max" in scheduler.keywords:
            scheduler = functools.partial(scheduler.func, *scheduler.args,
                                          **{**scheduler.keywords, "T_max": max_epochs})
        return dataclasses.replace(self, max_epochs=max_epochs, optimizer=optimizer, scheduler=scheduler,
                                   trainer={**self.trainer, "max_epochs": max_epochs})

    def make_trainer(self, loggers: list[Logger] | bool = False, **overrides: Any) -> pl.Trainer:
        """A Lightning trainer from the ``trainer`` config group (no checkpoints: the cache stores models).

        Lightning's progress bar only on a terminal (``trainer.enable_progress_bar``, default true); elsewhere,
        or with the bar off, one log line per epoch (:class:`~bdlab.training.progress.EpochLog`)."""
        kwargs = {**self.trainer, **overrides}
        if not (kwargs.get("enable_progress_bar", True) and is_terminal()):
            kwargs["enable_progress_bar"] = False
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), EpochLog()]
        return pl.Trainer(logger=loggers, enable_checkpointing=False, enable_model_summary=False, **kwargs)

    def configure_optimizers(self, parameters: Any) -> Any:
        """Lightning's ``configure_optimizers`` answer for ``parameters``: the optimizer, and its
        scheduler stepped once per ``interval``."""
        optimizer = self.optimizer(parameters)
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": self.interval}}
