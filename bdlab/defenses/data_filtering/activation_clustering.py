"""Activation clustering (Chen et al., 2018): poisoned samples form their own cluster in the
penultimate activations of their (target) class."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA, FastICA
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score
from torch import Tensor

from bdlab.defenses.data_filtering.base import DataFilteringDefense
from bdlab.errors import ConfigError, check_range

CRITERIA = ("silhouette", "size", "both")
DECOMPOSITIONS = ("pca", "ica")
RESTARTS = 5  # 2-means initialisations; the split of least inertia is kept
MAX_POINTS = 2000  # the silhouette is computed on a seeded subset of this many samples: it is quadratic


class ActivationClustering(DataFilteringDefense):
    """Activation clustering (Chen et al., 2018, §3-4; TrojanZoo Table 3 "Ac").

    For every class: reduce the penultimate activations of its samples to ``dims`` components
    (scikit-learn's PCA, or FastICA as Chen et al.), split them with 2-means (``KMeans``) and decide
    whether the class is poisoned: by the silhouette score of the split (a clean
    class fits two clusters badly), by the relative size of the smaller cluster (poison is a minority),
    or by both. In a poisoned class the smaller cluster is flagged and removed.

    The continuous score of a sample is ``silhouette_y * (1 + m) / 2`` with ``m`` in ``[-1, 1]`` its
    margin towards the smaller cluster, ``(d_big - d_small) / (d_big + d_small)``: samples of the
    smaller cluster of well-separated classes score highest.

    Args:
        dims: reduced dimension (default 10, Chen et al.).
        decomposition: ``pca`` (default: principal components keep the split's geometry, so one silhouette
            threshold serves every class) or ``ica`` (Chen et al.'s independent components, scaled to unit
            variance, which flattens the silhouette: lower ``silhouette_threshold`` with it).
        criterion: ``silhouette`` (default), ``size`` or ``both`` (all must hold).
        silhouette_threshold: a class whose split has a higher silhouette is poisoned (default 0.45;
            Chen et al. give no value).
        size_threshold: a class whose smaller cluster holds at most this share is poisoned
            (default 0.35, Chen et al.'s relative size).
        mode, retrain, fpr, max_inputs, seed: see :class:`~bdlab.defenses.data_filtering.base.DataFilteringDefense`.
    """

    name = "activation_clustering"

    def __init__(self, dims: int = 10, decomposition: str = "pca", criterion: str = "silhouette",
                 silhouette_threshold: float = 0.45, size_threshold: float = 0.35, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if decomposition not in DECOMPOSITIONS:
            raise ConfigError("defense.decomposition", f"got {decomposition!r}, must be one of {list(DECOMPOSITIONS)}")
        if dims < 1:
            raise ConfigError("defense.dims", f"got {dims}, must be >= 1")
        if criterion not in CRITERIA:
            raise ConfigError("defense.criterion", f"got {criterion!r}, must be one of {list(CRITERIA)}")
        check_range("defense.silhouette_threshold", silhouette_threshold, -1.0, 1.0)
        check_range("defense.size_threshold", size_threshold, 0.0, 0.5)
        self.dims, self.decomposition, self.criterion = dims, decomposition, criterion
        self.silhouette_threshold, self.size_threshold = silhouette_threshold, size_threshold
        # per class of the last detect(): (silhouette of the 2-means split, share of the smaller cluster)
        self.class_report: dict[int, tuple[float, float]] = {}

    def poisoned(self, silhouette: float, small_share: float) -> bool:
        by_silhouette = silhouette > self.silhouette_threshold
        by_size = small_share <= self.size_threshold
        return {"silhouette": by_silhouette, "size": by_size, "both": by_silhouette and by_size}[self.criterion]

    def split(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Reduce one class's features and 2-means them: (assignments, distances to both centres, silhouette)."""
        dims = min(self.dims, len(features) - 1, features.shape[1])
        if self.decomposition == "pca":
            reduced = PCA(dims, random_state=self.seed).fit_transform(features)
        else:
            with warnings.catch_warnings():
                # ICA on ReLU activations often stops at max_iter short of tol; the components still separate
                warnings.simplefilter("ignore", ConvergenceWarning)
                reduced = FastICA(dims, whiten="unit-variance", max_iter=1000, tol=0.005,  # Chen et al.'s code (ART)
                                  random_state=self.seed).fit_transform(features)
        kmeans = KMeans(n_clusters=2, n_init=RESTARTS, random_state=self.seed).fit(reduced)
        assign = kmeans.labels_
        if len(np.unique(assign)) < 2:  # identical points: no split, nothing to flag
            return assign, kmeans.transform(reduced), 0.0
        sample = MAX_POINTS if len(reduced) > MAX_POINTS else None
        return assign, kmeans.transform(reduced), float(silhouette_score(reduced, assign, sample_size=sample,
                                                                         random_state=self.seed))

    def detect(self, features: Tensor, labels: Tensor,
               clean: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        scores = torch.zeros(len(labels), dtype=torch.float64)
        flags = torch.zeros(len(labels), dtype=torch.bool)
        self.class_report = {}
        for label in labels.unique():
            index = (labels == label).nonzero().flatten()
            if len(index) < 4:
                continue
            assign, distances, score = self.split(features[index].double().numpy())
            sizes = np.bincount(assign, minlength=2)
            small = int(sizes.argmin())
            self.class_report[int(label)] = (score, sizes[small] / len(index))
            d_small, d_big = distances[:, small], distances[:, 1 - small]
            margin = (d_big - d_small) / np.maximum(d_big + d_small, 1e-12)
            scores[index] = torch.from_numpy(max(score, 0.0) * (1 + margin) / 2)
            if self.poisoned(*self.class_report[int(label)]):
                flags[index[torch.from_numpy(assign == small)]] = True
        return scores.float(), flags
