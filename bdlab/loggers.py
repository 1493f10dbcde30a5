"""Experiment loggers from the ``logger`` config group (W&B offline unless the user configured W&B)."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, WandbLogger

log = logging.getLogger(__name__)


def wandb_configured() -> bool:
    """True when the user gave W&B credentials (API key in the environment or ``wandb login``'s netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_offline() -> bool:
    """Offline unless credentials exist; ``WANDB_MODE=offline`` forces it."""
    return os.environ.get("WANDB_MODE", "") == "offline" or not wandb_configured()


def build_loggers(logger_cfg: DictConfig | None, save_dir: Path, group: str | None = None) -> list[Logger]:
    """Instantiate every logger of the group.

    For W&B, ``offline: null`` means "offline unless configured", and ``group: null`` takes
    ``group`` (the sweep a run belongs to), so dashboards can group a sweep's runs.
    """
    loggers: list[Logger] = []
    for name, node in (logger_cfg or {}).items():
        kwargs: dict[str, Any] = OmegaConf.to_container(node, resolve=True)
        kwargs.setdefault("save_dir", str(save_dir))
        if name == "wandb":
            if kwargs.get("offline") is None:
                kwargs["offline"] = wandb_offline()
            if kwargs.get("group") is None and group is not None:
                kwargs["group"] = group
        logger = instantiate(kwargs)
        if isinstance(logger, WandbLogger) and getattr(logger, "_wandb_init", {}).get("anonymous", 0) is None:
            # Lightning always passes anonymous=None, which recent W&B warns about on every run
            del logger._wandb_init["anonymous"]
        loggers.append(logger)
    return loggers


def log_images(loggers: list[Logger], images: dict[str, Path]) -> None:
    """Log image files as media under their keys (W&B only; the CSV logger has no media)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and images:
            for key, path in images.items():
                logger.log_image(key=key, images=[str(path)])


def close_loggers(loggers: list[Logger], status: str) -> None:
    """Finalize every logger and end the W&B run, so the next job of a sweep in the same
    process starts a run of its own instead of appending to this one."""
    for logger in loggers:
        logger.finalize(status)
        if isinstance(logger, WandbLogger):
            import wandb  # imported by WandbLogger already; only W&B runs get here

            if wandb.run is not None:
                offline = wandb.run.settings.mode == "offline" or wandb.run.offline
                run_dir = Path(wandb.run.dir).parent
                wandb.finish(exit_code=0 if status == "success" else 1)
                if offline:  # W&B's own lines are silenced (bdlab.console); this one is the hint that matters
                    log.info("W&B run saved offline; upload it with: wandb sync %s", run_dir)
