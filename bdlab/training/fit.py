"""Fit any LightningModule with the run's recipe: precision, devices, progress bar and loggers from Lightning."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
from pytorch_lightning.loggers import Logger

from bdlab.datasets.base import ImageSet
from bdlab.models.classifier import Classifier
from bdlab.training.hooks import TrainingHooks
from bdlab.training.loader import TensorBatches
from bdlab.training.recipe import TrainingRecipe
from bdlab.training.victim import BatchTransform, VictimModule

log = logging.getLogger(__name__)


def training_batches(train: ImageSet, recipe: TrainingRecipe, seed: int) -> TensorBatches:
    """Shuffled in-memory batches of ``train`` (with its poison flags and its copies' sources when it has
    them), seeded."""
    return TensorBatches(train.images, train.labels, recipe.batch_size, shuffle=True, seed=seed,
                         is_poison=getattr(train, "is_poison", None), pairs=getattr(train, "pairs", None))


def fit(module: pl.LightningModule, recipe: TrainingRecipe, seed: int, loggers: list[Logger] | bool = False,
        description: str = "model") -> None:
    """Train ``module`` with Lightning under the recipe's Trainer arguments, the global RNG seeded by
    ``seed`` first (augmentation and any per-batch randomness of the hooks draw from it)."""
    pl.seed_everything(seed, workers=True, verbose=False)
    trainer = recipe.make_trainer(loggers)
    log.info("training the %s for %d epochs", description, trainer.max_epochs)
    trainer.fit(module)


def fit_classifier(model: Classifier, train: ImageSet, recipe: TrainingRecipe, augment: BatchTransform | None = None,
                   hooks: TrainingHooks | None = None, loggers: list[Logger] | bool = False, name: str = "model",
                   seed: int | None = None) -> Classifier:
    """Train ``model`` in place on ``train`` with the victim module; ``seed`` (default: the recipe's)
    fixes the batch order and the augmentation."""
    seed = recipe.seed if seed is None else int(seed)
    module = VictimModule(model, training_batches(train, recipe, seed), recipe, augment, hooks, name)
    model.train()
    fit(module, recipe, seed, loggers, f"{name} model on {len(train)} images")
    return model.eval()
