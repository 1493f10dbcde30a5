"""Activation clustering (Chen et al., 2018): poisoned samples form their own cluster in the
penultimate activations of their (target) class."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bdlab.defenses.data_filtering.base import DataFilteringDefense
from bdlab.errors import ConfigError, check_range

CRITERIA = ("silhouette", "size", "both")


def pca_reduce(features: Tensor, dims: int) -> Tensor:
    """Project centred features on their top ``dims`` principal components (SVD)."""
    centred = features.double() - features.double().mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:dims].T


def kmeans2(points: Tensor, generator: torch.Generator, restarts: int = 5, iterations: int = 100) -> Tensor:
    """2-means (Lloyd, k-means++ seeding, best of ``restarts`` by inertia); returns 0/1 assignments."""
    best, best_inertia = torch.zeros(len(points), dtype=torch.long), float("inf")
    for _ in range(restarts):
        first = points[torch.randint(len(points), (1,), generator=generator)]
        weights = ((points - first) ** 2).sum(1)
        second = points[torch.multinomial(weights + 1e-12, 1, generator=generator)]
        centres = torch.cat([first, second])
        for _ in range(iterations):
            assign = torch.cdist(points, centres).argmin(1)
            updated = torch.stack([points[assign == k].mean(0) if (assign == k).any() else centres[k]
                                   for k in range(2)])
            if torch.allclose(updated, centres):
                break
            centres = updated
        inertia = ((points - centres[assign]) ** 2).sum().item()
        if inertia < best_inertia:
            best, best_inertia = assign, inertia
    return best


def silhouette(points: Tensor, assign: Tensor, generator: torch.Generator, max_points: int = 2000) -> float:
    """Mean silhouette coefficient of a 2-cluster assignment (on a seeded subset of ``max_points``)."""
    if len(points) > max_points:
        index = torch.randperm(len(points), generator=generator)[:max_points]
        points, assign = points[index], assign[index]
    if assign.unique().numel() < 2:
        return 0.0
    distances = torch.cdist(points, points)
    own = assign[:, None] == assign[None, :]
    own_count = (own.sum(1) - 1).clamp_min(1)
    a = (distances * own).sum(1) / own_count
    b = (distances * ~own).sum(1) / (~own).sum(1).clamp_min(1)
    s = (b - a) / torch.maximum(a, b).clamp_min(1e-12)
    s[own.sum(1) == 1] = 0.0  # singleton clusters score 0 by convention
    return s.mean().item()


class ActivationClustering(DataFilteringDefense):
    """Activation clustering (Chen et al., 2018, §3-4; TrojanZoo Table 3 "Ac").

    For every class: reduce the penultimate activations of its samples to ``dims`` dimensions
    (PCA here; Chen et al. use ICA and report PCA works as well), split them with 2-means and
    decide whether the class is poisoned: by the silhouette score of the split (a clean class
    fits two clusters badly), by the relative size of the smaller cluster (poison is a minority),
    or by both. In a poisoned class the smaller cluster is flagged and removed.

    The continuous score of a sample is ``silhouette_y * (1 + m) / 2`` with ``m`` in ``[-1, 1]`` its
    margin towards the smaller cluster, ``(d_big - d_small) / (d_big + d_small)``: samples of the
    smaller cluster of well-separated classes score highest.

    Args:
        dims: reduced dimension (default 10, Chen et al.).
        criterion: ``silhouette`` (default), ``size`` or ``both`` (all must hold).
        silhouette_threshold: a class whose split has a higher silhouette is poisoned (default 0.45;
            Chen et al. give no value: clean MNIST/LeNet classes split at 0.23-0.35, the class poisoned
            by BadNets at 10% at 0.51).
        size_threshold: a class whose smaller cluster holds at most this share is poisoned
            (default 0.35, Chen et al.'s relative size).
        mode, retrain, fpr, max_inputs, seed: see :class:`~bdlab.defenses.data_filtering.base.DataFilteringDefense`.
    """

    name = "activation_clustering"

    def __init__(self, dims: int = 10, criterion: str = "silhouette", silhouette_threshold: float = 0.45,
                 size_threshold: float = 0.35, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if dims < 1:
            raise ConfigError("defense.dims", f"got {dims}, must be >= 1")
        if criterion not in CRITERIA:
            raise ConfigError("defense.criterion", f"got {criterion!r}, must be one of {list(CRITERIA)}")
        check_range("defense.silhouette_threshold", silhouette_threshold, -1.0, 1.0)
        check_range("defense.size_threshold", size_threshold, 0.0, 0.5)
        self.dims, self.criterion = dims, criterion
        self.silhouette_threshold, self.size_threshold = silhouette_threshold, size_threshold
        # per class of the last detect(): (silhouette of the 2-means split, share of the smaller cluster)
        self.class_report: dict[int, tuple[float, float]] = {}

    def poisoned(self, silhouette_score: float, small_share: float) -> bool:
        by_silhouette = silhouette_score > self.silhouette_threshold
        by_size = small_share <= self.size_threshold
        return {"silhouette": by_silhouette, "size": by_size, "both": by_silhouette and by_size}[self.criterion]

    def detect(self, features: Tensor, labels: Tensor,
               clean: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        scores = torch.zeros(len(labels), dtype=torch.float64)
        flags = torch.zeros(len(labels), dtype=torch.bool)
        self.class_report = {}
        for label in labels.unique():
            index = (labels == label).nonzero().flatten()
            if len(index) < 4:
                continue
            reduced = pca_reduce(features[index], min(self.dims, len(index) - 1, features.shape[1]))
            assign = kmeans2(reduced, generator)
            sizes = torch.bincount(assign, minlength=2)
            small = int(sizes.argmin())
            share = sizes[small].item() / len(index)
            score = silhouette(reduced, assign, generator)
            self.class_report[int(label)] = (score, share)
            centres = torch.stack([reduced[assign == k].mean(0) for k in range(2)])
            distances = torch.cdist(reduced, centres)
            d_small, d_big = distances[:, small], distances[:, 1 - small]
            margin = (d_big - d_small) / (d_big + d_small).clamp_min(1e-12)
            scores[index] = max(score, 0.0) * (1 + margin) / 2
            if self.poisoned(score, share):
                flags[index[assign == small]] = True
        return scores.float(), flags
