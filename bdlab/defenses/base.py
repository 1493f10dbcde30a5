"""The defense base class; each category's evaluation protocol lives in its own module."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits
from bdlab.errors import ConfigError
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices

# Metrics that several categories report share one title, which names the TrojanZoo table the report's table of
# that metric corresponds to (TrojanZoo, Pang et al. EuroS&P 2022, Tables 8-13 and 16).
ARD = ("defense/ard", "ARD: ASR before - after the defense (points; TrojanZoo Table 8)")
DEFENSE_CAD = ("defense/cad", "CAD of the defense: ACC before - after (points; TrojanZoo Table 9)")
TPR = ("defense/tpr", "Input filtering: TPR at 5% FPR (%; TrojanZoo Table 10)")
AIV = ("defense/aiv_target", "Model inspection: AIV of the target class, trojaned model (TrojanZoo Table 11)")
MLN = ("defense/mln", "Model inspection: MLN, L1 norm of the target's recovered mask (TrojanZoo Table 12)")
MJS = ("defense/mjs", "Model inspection: MJS, Jaccard of the recovered and true masks (TrojanZoo Table 12)")
ART_MODEL = ("defense/art_s", "ART: defense running time per model (s; TrojanZoo Table 13)")
ART_INPUT = ("defense/time_per_input_ms", "ART: input filtering time per input (ms; TrojanZoo Table 13)")
DEFENSE_NSR = ("defense/nsr", "NSR of the defended model (TrojanZoo Table 16)")


@dataclass(frozen=True)
class Residual:
    """Which of a defense's metrics answer "does this defense work against this attack?", as its category
    defines them; each run records them in ``results.json`` (``"residual"``) and the report leads with them.

    ``asr``: key of the ASR left under the defense (%); ``cost``: key of what the defense costs in clean
    accuracy (points), or a number where that is known without measuring (no defense: 0); ``flagged`` and
    ``aiv``: for a defense that inspects the model instead of changing it, keys of whether it flagged the
    attack's target class (1 or 0) and the target's anomaly index. ``meaning`` says in words what the
    ``asr`` figure (or the verdict) is. None: the figure does not apply to the category (n/a, never 0).
    """

    meaning: str
    asr: str | None = None
    cost: str | float | None = None
    flagged: str | None = None
    aiv: str | None = None

    def record(self) -> dict[str, Any]:
        """The form ``results.json`` holds."""
        return dataclasses.asdict(self)


def check_held_out_share(field: str, asked: int, data: DatasetSplits) -> None:
    """Refuse, naming ``field``, a number of held-out clean images larger than the held-out split."""
    if asked > len(data.defense):
        raise ConfigError(field, f"got {asked}, but the held-out clean split has only {len(data.defense)} images; "
                                 "lower it or raise dataset.defense_fraction")


class Defense(ABC):
    """Base of every defense. ``setup`` validates against the data before anything is trained;
    ``run`` applies the defense and returns metrics under stable ``defense/...`` keys."""

    name = "defense"
    category = "none"
    #: (results.json key, title) of the metrics the report draws tables of for this defense
    headline_metrics: tuple[tuple[str, str], ...] = ()
    #: the metrics that say whether it works (each category declares its own)
    residual = Residual("not declared by this defense")

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        """Validate parameters against the dataset and attack; raise ConfigError on bad values."""

    def check_model(self, model: Classifier) -> None:
        """Validate parameters against the run's architecture (a fresh, untrained model: layer names,
        channel counts); raise ConfigError on bad values. Nothing to check by default."""

    @abstractmethod
    def run(self, context: RunServices) -> dict[str, Any]:
        """Apply the defense and measure it."""


class NoDefense(Defense):
    """No defense: the run reports the undefended attack only."""

    name = "none"
    residual = Residual("the undefended ASR", asr="trojan/asr", cost=0.0)

    def run(self, context: RunServices) -> dict[str, Any]:
        return {}
