"""Experiment loggers from the ``logger`` config group (W&B offline unless the user configured W&B)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger


def wandb_configured() -> bool:
    """True when the user gave W&B credentials (API key in the environment or ``wandb login``'s netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def build_loggers(logger_cfg: DictConfig | None, save_dir: Path) -> list[Logger]:
    """Instantiate every logger of the group; ``offline: null`` for W&B means "offline unless configured"."""
    loggers: list[Logger] = []
    for name, node in (logger_cfg or {}).items():
        kwargs: dict[str, Any] = OmegaConf.to_container(node, resolve=True)
        kwargs.setdefault("save_dir", str(save_dir))
        if name == "wandb" and kwargs.get("offline") is None:
            kwargs["offline"] = os.environ.get("WANDB_MODE", "") == "offline" or not wandb_configured()
        loggers.append(instantiate(kwargs))
    return loggers
