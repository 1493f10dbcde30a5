"""Train a classifier with Lightning from the run's config."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger

from bdlab.datasets.base import ImageSet
from bdlab.models.classifier import Classifier
from bdlab.training.loader import TensorBatches
from bdlab.training.victim import BatchTransform, VictimModule

log = logging.getLogger(__name__)


def make_trainer(trainer_cfg: DictConfig, loggers: list[Logger] | bool = False, **overrides: Any) -> pl.Trainer:
    """A Lightning trainer from the ``trainer`` config group (no checkpoints: the cache stores models)."""
    kwargs = OmegaConf.to_container(trainer_cfg, resolve=True)
    kwargs.update(overrides)
    return pl.Trainer(logger=loggers, enable_checkpointing=False, enable_model_summary=False, **kwargs)


def fit_classifier(model: Classifier, train: ImageSet, cfg: DictConfig, train_transform: BatchTransform | None = None,
                   loggers: list[Logger] | bool = False, name: str = "model", seed: int | None = None) -> Classifier:
    """Train ``model`` in place on ``train`` with the run's recipe (``optimizer``, ``scheduler``,
    ``model.batch_size``, ``trainer``, ``seed``); ``seed`` overrides the run's (batch order, augmentation)."""
    seed = int(cfg.seed) if seed is None else int(seed)
    pl.seed_everything(seed, workers=True, verbose=False)
    batches = TensorBatches(train.images, train.labels, int(cfg.model.batch_size), shuffle=True, seed=seed)
    module = VictimModule(model, batches, optimizer=instantiate(cfg.optimizer),
                          scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
                          train_transform=train_transform, name=name)
    trainer = make_trainer(cfg.trainer, loggers)
    log.info("training the %s model on %d images for %d epochs", name, len(train), trainer.max_epochs)
    model.train()
    trainer.fit(module)
    return model.eval()
