"""The training-data filtering protocol, for defenses that score samples by their penultimate features.

``mode: train_data`` (the defenses' original setting): every sample of the poisoned training
set gets a suspicion score and the algorithm's own keep/remove decision. Against the true
poison flags the protocol reports ``defense/poison_tpr`` and ``defense/poison_fpr`` (percent
of poisoned / clean samples removed), ``defense/poison_roc_auc`` (from the continuous scores)
and ``defense/removed``. With ``retrain: true`` a fresh model is trained with the run's recipe
on the kept samples (``RunServices.retrain``, cached by content) and ``defense/acc``,
``defense/asr``, ``defense/ard`` (ASR before - after) and ``defense/cad`` (ACC before - after)
are reported against the undefended trojan model. When the decision removes every training sample
(e.g. spectral signatures' ``1.5 * epsilon`` reaches 1 at a 20% dirty-label rate) there is nothing to
retrain on: those metrics are absent (n/a in the report) and a warning names the fields to change.

``mode: inference`` (TrojanZoo's use): the incoming inputs (held-out clean, clean test,
poisoned test) are grouped by the trojan model's *predicted* class, scored the same way, and
evaluated with the input-filtering protocol of :mod:`bdlab.defenses.input_filtering.base`.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor

from bdlab.attacks.base import Attack, NoAttack
from bdlab.datasets.base import DatasetSplits, ImageSet
from bdlab.defenses.base import ARD, DEFENSE_CAD, Defense, Residual
from bdlab.defenses.input_filtering.base import (
    FILTER_METRICS,
    FILTER_RESIDUAL,
    check_filter_settings,
    detection_rates,
    filter_inputs,
)
from bdlab.errors import ConfigError
from bdlab.evaluate import defense_effect, evaluate, predict
from bdlab.models.classifier import LOGITS, PENULTIMATE, Classifier
from bdlab.services import RunServices

log = logging.getLogger(__name__)

MODES = ("train_data", "inference")


def penultimate_features(model: Classifier, images: Tensor) -> tuple[Tensor, Tensor]:
    """Penultimate features (float32, CPU) and predicted classes of uint8 ``images``."""
    outputs = predict(model, images, layers=[PENULTIMATE, LOGITS])
    return outputs[PENULTIMATE], outputs[LOGITS].argmax(1)


class DataFilteringDefense(Defense):
    """Base of defenses that find poisoned samples in penultimate features, class by class.

    Subclasses implement :meth:`detect`. Args:
        mode: ``train_data`` (default) or ``inference`` (see the module docstring).
        retrain: in ``train_data`` mode, retrain on the kept samples and report ASR/ACC/ARD/CAD
            (default true). Needs a poisoned training set, so not with ``attack=none``.
        fpr, max_inputs, seed: the input-filtering protocol's
            (:class:`~bdlab.defenses.input_filtering.base.InputFilteringDefense`), used in ``inference`` mode.
    """

    category = "data_filtering"
    training_data_metrics = (
        ("defense/poison_tpr", "Data filtering: TPR on poisoned training samples (%)"),
        ("defense/poison_fpr", "Data filtering: FPR on clean training samples (%)"),
        ("defense/poison_roc_auc", "Data filtering: ROC-AUC"),
        ("defense/acc", "ACC after retraining on the kept samples (%)"),
        ("defense/asr", "ASR after retraining on the kept samples (%)"),
        ARD,
        DEFENSE_CAD,
    )
    # the kept samples train the model that is deployed: its ASR is what the attack keeps (n/a without retraining)
    residual = Residual("ASR of the model retrained on the kept samples", asr="defense/asr", cost="defense/cad")
    #: whether :meth:`detect` compares against held-out clean features (see :meth:`clean_reference`)
    needs_clean_reference = False
    #: the settings that decide how much is removed, named when the decision removes everything
    removal_hint = "change the settings that decide how much is removed"

    def __init__(self, mode: str = "train_data", retrain: bool = True, fpr: float = 0.05, max_inputs: int | None = None,
                 seed: int = 0) -> None:
        check_filter_settings(fpr, max_inputs)
        if mode not in MODES:
            raise ConfigError("defense.mode", f"got {mode!r}, must be one of {list(MODES)}")
        self.mode, self.retrain, self.fpr, self.max_inputs, self.seed = mode, retrain, fpr, max_inputs, seed
        if mode == "inference":
            self.category, self.headline_metrics, self.residual = "input_filtering", FILTER_METRICS, FILTER_RESIDUAL
        else:
            self.headline_metrics = self.training_data_metrics

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        if self.mode == "train_data" and not attack.trains:
            raise ConfigError("defense.mode", f"{self.name} filters the training set, and a given model comes "
                              "without one; set defense.mode=inference to filter test inputs instead")
        if self.mode == "train_data" and self.retrain and isinstance(attack, NoAttack):
            raise ConfigError("defense.retrain", "retraining on the kept samples needs a poisoned training set, and "
                              "attack=none has none; pick an attack or set defense.retrain=false")

    @abstractmethod
    def detect(self, features: Tensor, labels: Tensor,
               clean: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``(scores, flags)`` per sample: continuous suspicion and the algorithm's own removal decision.

        ``clean`` is ``(features, labels)`` of the held-out clean split, given when
        :attr:`needs_clean_reference` is set."""

    def clean_reference(self, context: RunServices) -> tuple[Tensor, Tensor] | None:
        """Penultimate features and true labels of the held-out clean split (defense split), under
        the trojaned model; None unless the detector asks for them."""
        if not self.needs_clean_reference:
            return None
        features, _ = penultimate_features(context.trojan_model(), context.data.defense.images)
        return features, context.data.defense.labels

    def scores(self, context: RunServices, images: Tensor) -> Tensor:
        features, predictions = penultimate_features(context.trojan_model(), images)
        return self.detect(features, predictions, self.clean_reference(context))[0]

    def run(self, context: RunServices) -> dict[str, Any]:
        if self.mode == "inference":
            return filter_inputs(context, self.scores, self.fpr, self.max_inputs, self.seed, self.name)
        train = context.poisoned_train
        if train is None:  # attack=none without retraining: every sample is clean
            train = ImageSet(context.data.train.images, context.data.train.labels)
            is_poison = torch.zeros(len(train), dtype=torch.bool)
        else:
            is_poison = train.is_poison
        log.info("%s: scoring %d training samples by their penultimate features", self.name, len(train))
        features, _ = penultimate_features(context.trojan_model(), train.images)
        scores, flags = self.detect(features, train.labels, self.clean_reference(context))
        metrics: dict[str, Any] = {**detection_rates(flags[~is_poison], scores[~is_poison], flags[is_poison],
                                                     scores[is_poison], "defense/poison_"),
                                   "defense/removed": int(flags.sum())}
        keep = (~flags).nonzero().flatten()
        if self.retrain and context.poisoned_test is not None and len(keep) == 0:
            log.warning("%s removed all %d training samples, so there is nothing to retrain on and the ACC/ASR "
                        "after it are n/a; %s", self.name, len(flags), self.removal_hint)
        elif self.retrain and context.poisoned_test is not None:
            model = context.retrain(ImageSet(train.images[keep], train.labels[keep]), self.name)
            after = evaluate(model, context.data.test, context.poisoned_test, context.attack.target_class)
            metrics.update(defense_effect(context.undefended, after))
        return metrics
