"""The defense base class; each category's evaluation protocol lives in its own module."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from bdlab.attacks.base import Attack
from bdlab.context import RunContext
from bdlab.datasets.base import DatasetSplits
from bdlab.models.classifier import Classifier


class Defense(ABC):
    """Base of every defense. ``setup`` validates against the data before anything is trained;
    ``run`` applies the defense and returns metrics under stable ``defense/...`` keys."""

    name = "defense"
    category = "none"
    #: (results.json key, title) of the metrics the report draws tables of for this defense
    headline_metrics: tuple[tuple[str, str], ...] = ()

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        """Validate parameters against the dataset and attack; raise ConfigError on bad values."""

    def check_model(self, model: Classifier) -> None:
        """Validate parameters against the run's architecture (a fresh, untrained model: layer names,
        channel counts); raise ConfigError on bad values. Nothing to check by default."""

    @abstractmethod
    def run(self, context: RunContext) -> dict[str, Any]:
        """Apply the defense and measure it."""


class NoDefense(Defense):
    """No defense: the run reports the undefended attack only."""

    name = "none"

    def run(self, context: RunContext) -> dict[str, Any]:
        return {}
