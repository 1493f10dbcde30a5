"""In-memory image sets, the train / defense / test split, and the dataset base class.

Pixel convention of the whole project: images are stored as uint8 in ``[0, 255]``; every
trigger, transform and metric works on float tensors in ``[0, 1]`` (``to_float``), and the
model wrapper normalises with the dataset's statistics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bdlab.errors import ConfigError, check_range


def to_float(images: Tensor) -> Tensor:
    """uint8 ``[0, 255]`` -> float32 ``[0, 1]``."""
    return images.float().div_(255.0)


def to_uint8(images: Tensor) -> Tensor:
    """float ``[0, 1]`` -> uint8 ``[0, 255]``, rounding to the nearest level."""
    return images.clamp(0.0, 1.0).mul(255.0).round_().to(torch.uint8)


@dataclass(frozen=True)
class ImageSet:
    """Images (uint8, ``(N, C, H, W)``) and their int64 labels."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must have one entry per image")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: Tensor) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index])


@dataclass(frozen=True)
class PoisonedTestSet(ImageSet):
    """Triggered test images with their *true* labels and ``sources``: the index, in the clean test set,
    of the image each was made from (stealthiness and NSR compare each with its source)."""

    sources: Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sources is None or self.sources.shape != self.labels.shape:
            raise ValueError("sources must hold one test-set index per poisoned image")

    def subset(self, index: Tensor) -> PoisonedTestSet:
        return PoisonedTestSet(self.images[index], self.labels[index], self.sources[index])


@dataclass(frozen=True)
class DatasetSplits:
    """Everything a run needs from a dataset.

    ``defense`` is the held-out clean split that defenses may use; it is disjoint from
    ``test``, on which every metric is evaluated. ``class_names`` (default None: the class
    indices) label tables and pictures. ``fingerprint`` (default None) is a digest of the
    files a dataset read where its config does not determine its images (your own data):
    every model's cache key includes it, so changed files mean new models.
    """

    name: str
    train: ImageSet
    defense: ImageSet
    test: ImageSet
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int = 0
    hflip: bool = False
    class_names: tuple[str, ...] | None = None
    fingerprint: str | None = None

    def class_name(self, label: int) -> str:
        """The name of class ``label`` (its index where the dataset names none)."""
        return self.class_names[label] if self.class_names is not None else str(label)

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.train.images.shape[2:])  # type: ignore[return-value]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]


def channel_stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in ``[0, 1]`` units."""
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).double().div_(255.0)
    return tuple(flat.mean(1).tolist()), tuple(flat.std(1).clamp_min(1e-3).tolist())


class ImageDataset(ABC):
    """Base of every dataset option: loads raw train/test sets and derives the splits.

    Args:
        root: data directory (downloads go here when a network exists).
        defense_fraction: share of the test set held out, clean, for defenses (default 0.05).
        split_seed: seed of the held-out split.
        crop_padding: random-crop padding of the training augmentation (0 = none).
        hflip: random horizontal flip in the training augmentation.
        download: try to download missing files.
    """

    name: str = "dataset"
    #: the class names, where the dataset has them (own data: read from the files by ``load_raw``)
    class_names: tuple[str, ...] | None = None
    #: the digest of the files ``load_raw`` read, where the config alone does not determine the images
    fingerprint: str | None = None

    def __init__(self, root: str | Path = "data", defense_fraction: float = 0.05, split_seed: int = 0,
                 crop_padding: int = 0, hflip: bool = False, download: bool = True) -> None:
        check_range("dataset.defense_fraction", defense_fraction, 0.0, 1.0, low_open=True, high_open=True)
        if crop_padding < 0:
            raise ConfigError("dataset.crop_padding", f"got {crop_padding}, must be >= 0")
        self.root = Path(root).expanduser()
        self.defense_fraction = defense_fraction
        self.split_seed = split_seed
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.download = download

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Number of classes."""

    @abstractmethod
    def load_raw(self) -> tuple[ImageSet, ImageSet]:
        """The official train and test sets; raise ConfigError('dataset', ...) when absent."""

    def load(self) -> DatasetSplits:
        train, test = self.load_raw()
        generator = torch.Generator().manual_seed(self.split_seed)
        order = torch.randperm(len(test), generator=generator)
        n_defense = max(1, round(self.defense_fraction * len(test)))
        if n_defense >= len(test):
            raise ConfigError("dataset.defense_fraction", f"the test set has {len(test)} image(s): too few to hold "
                              f"out {n_defense} for defenses and keep some to evaluate on; give more test images")
        mean, std = channel_stats(train.images)
        return DatasetSplits(
            name=self.name, train=train, defense=test.subset(order[:n_defense].sort().values),
            test=test.subset(order[n_defense:].sort().values), num_classes=self.num_classes,
            mean=mean, std=std, crop_padding=self.crop_padding, hflip=self.hflip, class_names=self.class_names,
            fingerprint=self.fingerprint)


def split_by_fraction(images: ImageSet, fraction: float, seed: int, field: str) -> tuple[ImageSet, ImageSet]:
    """``(train, test)``: ``fraction`` of each class's images, drawn with ``seed``, go to the test set. Stratified,
    so every class keeps its share on both sides however few images it has; ``field`` names the fraction in the
    error when the test set would be too small to split further (defense and evaluation images)."""
    generator = torch.Generator().manual_seed(seed)
    is_test = torch.zeros(len(images), dtype=torch.bool)
    for label in images.labels.unique().tolist():
        members = (images.labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        is_test[members[:round(fraction * len(members))]] = True
    if int(is_test.sum()) < 2:
        raise ConfigError(field, f"got {fraction}: it holds out {int(is_test.sum())} of {len(images)} images for "
                          "testing, and at least 2 are needed; raise it or give a separate test split")
    return images.subset(~is_test), images.subset(is_test)


def missing_files_error(name: str, root: Path, what: str) -> ConfigError:
    """The one-line message for a dataset absent offline."""
    return ConfigError("dataset", f"{name} not found under {root.resolve()}: {what} "
                       "(or set dataset.root=<dir> to where they are)")
