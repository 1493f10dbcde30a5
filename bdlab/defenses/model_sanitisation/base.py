"""The model-sanitisation protocol (docs/metrics.md, "Model sanitisation"; TrojanZoo §5.3.1, Tables 8-9).

A sanitiser returns a new model from the trojaned one. The protocol caches it under its own key
(the trojaned model's key and the defense's settings, in ``models/sanitized/<name>/``), evaluates
it with the one evaluator and reports, against the undefended model: ``defense/acc``,
``defense/asr``, ``defense/ccc``, ``defense/tmc``, their ``*_before`` values, ``defense/ard``
(ASR before - after), ``defense/cad`` (ACC before - after), ``defense/nsr`` (the sanitised model's
neuron separation ratio, :mod:`bdlab.nsr`; the trojaned model's is ``trojan/nsr``) and
``defense/art_s`` (the sanitisation's running time, as measured when it ran, also on a cache hit).
"""

from __future__ import annotations

import copy
import logging
from abc import abstractmethod
from typing import Any

import torch

from bdlab.datasets.base import ImageSet
from bdlab.defenses.base import ARD, ART_MODEL, DEFENSE_CAD, DEFENSE_NSR, Defense, Residual
from bdlab.evaluate import defense_effect, evaluate
from bdlab.models.classifier import Classifier
from bdlab.nsr import NSRSettings
from bdlab.services import RunServices
from bdlab.training.augment import TrainAugment
from bdlab.training.fit import fit_classifier
from bdlab.training.recipe import TrainingRecipe

log = logging.getLogger(__name__)


def fine_tune(model: Classifier, train: ImageSet, recipe: TrainingRecipe, epochs: int, lr: float,
              augment: TrainAugment | None, seed: int, name: str) -> Classifier:
    """Train ``model`` further, in place, on ``train`` with the run's recipe at ``lr`` for ``epochs``
    (the victim module through Lightning)."""
    return fit_classifier(model, train, recipe.variant(epochs, lr), augment, name=name, seed=seed)


class ModelSanitization(Defense):
    """Base of the model-sanitisation defenses: subclasses implement :meth:`sanitize` and :meth:`settings`."""

    category = "model_sanitization"
    headline_metrics = (
        ("defense/acc", "ACC of the sanitised model (%)"),
        ("defense/asr", "ASR of the sanitised model (%)"),
        ARD,
        DEFENSE_CAD,
        ART_MODEL,
        DEFENSE_NSR,
    )
    residual = Residual("ASR of the sanitised model", asr="defense/asr", cost="defense/cad")

    @abstractmethod
    def sanitize(self, model: Classifier, context: RunServices) -> dict[str, Any]:
        """Change ``model`` (a copy of the trojaned model) in place; returns scalars to report."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything that determines the sanitised model besides the trojaned model and the held-out data."""

    def run(self, context: RunServices) -> dict[str, Any]:
        model = copy.deepcopy(context.trojan_model())
        expected = set(model.state_dict())
        reports: dict[str, Any] = {}

        def build() -> dict[str, torch.Tensor]:
            log.info("%s: sanitising the trojaned model", self.name)
            reports.update(self.sanitize(model, context))
            extra = {f"report/{key}": torch.tensor(float(value)) for key, value in reports.items()}
            return {**{f"model/{k}": v for k, v in model.state_dict().items()}, **extra}

        spec = {"model": context.trojan_key(), "defense": self.name, "settings": self.settings(),
                "held_out": context.digest(context.data.defense)}
        tensors, seconds = context.cached(f"models/sanitized/{self.name}", spec, build,
                                          lambda found: {k.removeprefix("model/") for k in found
                                                         if k.startswith("model/")} == expected)
        model.load_state_dict({k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")})
        model.to(context.device).eval()
        after = evaluate(model, context.data.test, context.poisoned_test, context.attack.target_class)
        metrics = defense_effect(context.undefended, after)
        metrics["defense/art_s"] = seconds
        metrics.update({f"defense/{k.removeprefix('report/')}": float(v) for k, v in tensors.items()
                        if k.startswith("report/")})
        if context.poisoned_test is not None:
            metrics["defense/nsr"] = NSRSettings.from_config(context.cfg).measure(model, context)
        metrics.update(self.compare(context, context.trojan_model(), model))
        return metrics

    def compare(self, context: RunServices, before: Classifier, after: Classifier) -> dict[str, Any]:
        """Further measurements of the model before and after sanitisation (default: none)."""
        return {}
