"""The analysis base class: validated before training, run on the trained models, writes files."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices


class Analysis(ABC):
    """Base of every option of the ``analysis`` group (several may run: ``analysis=[a,b]``).

    ``setup`` raises ConfigError on values that cannot work, before anything is trained;
    ``run`` writes its CSV / PNG files under ``context.output_dir / name``, logs them to
    ``context.loggers``, and returns scalar summaries for ``results.json`` under
    ``analysis/<name>/...`` keys.
    """

    name = "analysis"
    #: (results.json key, title) of the metrics the report draws tables of (analyses write their own files)
    headline_metrics: tuple[tuple[str, str], ...] = ()

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        """Validate against the dataset and attack."""

    def check_model(self, model: Classifier) -> None:
        """Validate against the run's architecture (a fresh, untrained model: named layers), before anything
        is trained; raise ConfigError on bad values. Nothing to check by default."""

    @abstractmethod
    def run(self, context: RunServices) -> dict[str, Any]:
        """Run the study on the trained models."""
