"""What the pipeline hands to defenses and analyses once the models exist."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from pytorch_lightning.loggers import Logger

from bdlab.attacks.base import Attack, PoisonedSet
from bdlab.datasets.base import DatasetSplits, ImageSet
from bdlab.cache import ArtifactCache
from bdlab.evaluate import Evaluation
from bdlab.models.classifier import Classifier
from bdlab.training.recipe import TrainingRecipe


@dataclass
class RunContext:
    """The data, both models and the attack's published ground truth (target class, trigger mask).

    ``poisoned_test`` holds the stamped test images of non-target classes with their *true*
    labels (None without an attack); ``undefended`` the trojaned model's evaluation (ACC, CCC,
    ASR, TMC), so a defense reports differences to it. ``retrain(train_set, tag)`` trains a fresh
    model with the run's recipe on any training set (cached by its content), for defenses that
    filter training data. ``output_dir`` is where files (CSV, PNG) go; ``loggers`` take tables and
    images. ``cache``, ``model_keys`` (the cache keys of the ``clean`` and ``trojan`` models) and
    ``recipe`` serve defenses that store artifacts derived from a model (recovered triggers,
    sanitised models) and train with the run's recipe.
    """

    cfg: DictConfig
    data: DatasetSplits
    attack: Attack
    clean_model: Classifier
    trojan_model: Classifier
    poisoned_train: PoisonedSet | None
    poisoned_test: ImageSet | None
    output_dir: Path
    device: torch.device
    retrain: Callable[[ImageSet, str], Classifier]
    undefended: Evaluation
    loggers: list[Logger] = field(default_factory=list)
    cache: ArtifactCache | None = None
    model_keys: dict[str, str] = field(default_factory=dict)
    recipe: TrainingRecipe | None = None
