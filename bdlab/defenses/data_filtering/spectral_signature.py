"""Spectral signatures (Tran et al., NeurIPS 2018): poisoned samples stand out along the top
singular direction of their class's centred penultimate features."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bdlab.attacks.base import Attack, NoAttack
from bdlab.datasets.base import DatasetSplits
from bdlab.defenses.data_filtering.base import DataFilteringDefense
from bdlab.errors import ConfigError, check_range

CENTRES = ("class_mean", "clean_mean")


def spectral_scores(features: Tensor, centre: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Tran et al. Alg. 1 outlier scores of one class: ``tau_i = ((R_i - c) . v)^2`` with ``v`` the
    top right singular vector of the centred feature matrix ``R - c``; ``c`` is the class's own
    mean (Alg. 1) unless ``centre`` is given. Returns the scores and ``v``."""
    features = features.double()
    centred = features - (features.mean(0, keepdim=True) if centre is None else centre.double()[None])
    if len(centred) < 2:
        return torch.zeros(len(centred), dtype=torch.float64), torch.zeros(features.shape[1], dtype=torch.float64)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[0]) ** 2, vh[0]


def expected_class_fraction(attack: Attack, num_classes: int) -> float:
    """The share of poisoned samples in the target class that the attack's published rate implies."""
    if isinstance(attack, NoAttack):
        return 0.0
    if attack.clean_label:
        return attack.poison_rate
    poisoned_per_class = attack.poison_rate * num_classes
    return poisoned_per_class / (1.0 + poisoned_per_class)


class SpectralSignature(DataFilteringDefense):
    """Spectral signatures (Tran et al., NeurIPS 2018, Algorithm 1; TrojanZoo Table 3 "Ss").

    For every class ``y``: centre the penultimate features of its samples, take the top right
    singular vector ``v``, score ``tau_i = ((R_i - mean_y) . v)^2`` and remove the
    ``ceil(1.5 * epsilon * |S_y|)`` highest-scoring samples of the class. Scores are divided by
    the class's median score (``clean_mean``: the median score of its held-out clean samples) so
    that the global ROC-AUC compares classes on one scale (the removal, a per-class ranking, is
    unaffected).

    Centring on the class's own mean is why the method needs the poison to be a minority of the
    class: Tran et al. evaluate 5% and 10% *of the target class*. When the poison is about half
    of the class (10% of MNIST's training set relabelled to one class) the mean falls between
    the two clusters, both score alike and the ranking is chance (docs/filtering.md has the figures).
    ``centre: clean_mean`` is bdlab's variant for that regime, not part of Tran et al.: it
    centres each class on the mean features of its *held-out clean* samples (the defense split,
    which every bdlab defense may use), so the poison cluster is the one far from the centre.

    Args:
        poison_fraction: ``epsilon``, the expected fraction of poisoned samples *in a class* (Tran et
            al. assume an upper bound is known). Null (default) derives it from the attack: a
            dirty-label rate ``r`` of ``K`` balanced classes puts ``r N`` poisoned samples into a class
            of ``N / K``, so ``epsilon = r K / (1 + r K)`` (0.5 at 10%, 0.09 at 1% on MNIST;
            2/3 at 20%, where the default removal of 1.5 epsilon takes every sample); a
            clean-label rate is already a share of the target class; no attack expects none.
        removal_factor: how many times ``epsilon`` to remove per class (default 1.5, Tran et al.).
        centre: ``class_mean`` (default, Tran et al. Alg. 1) or ``clean_mean`` (see above).
        mode, retrain, fpr, max_inputs, seed: see :class:`~bdlab.defenses.data_filtering.base.DataFilteringDefense`.
    """

    name = "spectral_signature"
    removal_hint = "lower defense.removal_factor or set defense.poison_fraction below 1 / removal_factor"

    def __init__(self, poison_fraction: float | None = None, removal_factor: float = 1.5, centre: str = "class_mean",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if poison_fraction is not None:
            check_range("defense.poison_fraction", poison_fraction, 0.0, 1.0, low_open=True)
        check_range("defense.removal_factor", removal_factor, 0.0, 100.0, low_open=True)
        if centre not in CENTRES:
            raise ConfigError("defense.centre", f"got {centre!r}, must be one of {', '.join(CENTRES)}")
        self.poison_fraction, self.removal_factor, self.centre = poison_fraction, removal_factor, centre
        self.epsilon = poison_fraction

    @property
    def needs_clean_reference(self) -> bool:  # type: ignore[override]
        return self.centre == "clean_mean"

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        super().setup(data, attack)
        if self.needs_clean_reference:
            missing = sorted(set(range(data.num_classes)) - set(data.defense.labels.unique().tolist()))
            if missing:
                raise ConfigError("defense.centre", f"clean_mean needs held-out clean samples of every class and the "
                                  f"defense split has none of class {missing[0]}; use centre=class_mean or a larger "
                                  "dataset.defense_fraction")
        self.epsilon = self.poison_fraction if self.poison_fraction is not None else expected_class_fraction(
            attack, data.num_classes)

    def detect(self, features: Tensor, labels: Tensor,
               clean: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if self.epsilon is None:
            raise RuntimeError("give poison_fraction or call setup(data, attack) first")
        if self.needs_clean_reference and clean is None:
            raise ValueError("centre=clean_mean needs the held-out clean features")
        epsilon = self.epsilon
        scores = torch.zeros(len(labels), dtype=torch.float64)
        flags = torch.zeros(len(labels), dtype=torch.bool)
        for label in labels.unique():
            index = (labels == label).nonzero().flatten()
            if clean is not None and self.needs_clean_reference:
                reference = clean[0][clean[1] == label].double()
                if len(reference) == 0:
                    raise ValueError(f"no held-out clean features of class {int(label)}")
                centre = reference.mean(0)
                tau, direction = spectral_scores(features[index], centre)
                # the clean samples' own spread is the scale, so a class that is half poison is not shrunk
                scale = (((reference - centre) @ direction) ** 2).median()
            else:
                tau, _ = spectral_scores(features[index])
                scale = tau.median()
            scores[index] = tau / scale.clamp_min(1e-12)
            # the tolerance keeps 1.5 * 0.1 * 200 at 30, not 31, despite floating point
            remove = min(len(index), math.ceil(self.removal_factor * epsilon * len(index) - 1e-9))
            flags[index[tau.argsort(descending=True)[:remove]]] = True
        return scores.float(), flags
