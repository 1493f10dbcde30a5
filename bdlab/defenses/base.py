"""The defense base class and the context a defense receives from the pipeline."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bdlab.attacks.base import Attack, PoisonedSet
from bdlab.datasets.base import DatasetSplits, ImageSet
from bdlab.models.classifier import Classifier


@dataclass
class DefenseContext:
    """What the pipeline hands a defense: the data, both models, and the attack's published ground truth.

    ``poisoned_test`` holds the stamped test images of non-target classes with their true
    labels; ``baseline`` the undefended metrics (so a defense reports differences to them).
    """

    data: DatasetSplits
    attack: Attack
    clean_model: Classifier
    trojan_model: Classifier
    poisoned_train: PoisonedSet | None
    poisoned_test: ImageSet | None
    output_dir: Path
    baseline: dict[str, float] = field(default_factory=dict)


class Defense(ABC):
    """Base of every defense. ``setup`` validates against the data before anything is trained;
    ``run`` applies the defense and returns metrics under stable ``defense/...`` keys."""

    name = "defense"
    category = "none"

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        """Validate parameters against the dataset and attack; raise ConfigError on bad values."""

    @abstractmethod
    def run(self, context: DefenseContext) -> dict[str, Any]:
        """Apply the defense and measure it."""


class NoDefense(Defense):
    """No defense: the run reports the undefended attack only."""

    name = "none"

    def run(self, context: DefenseContext) -> dict[str, Any]:
        return {}
