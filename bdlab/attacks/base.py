"""The attack base class: seeded poison indices, batched stamping, relabelling, poisoned sets."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from bdlab.datasets.base import DatasetSplits, ImageSet, to_float, to_uint8
from bdlab.errors import ConfigError, check_range
from bdlab.transforms import check_shrink, random_flip, random_shrink_pad

if TYPE_CHECKING:
    from bdlab.cache import ArtifactCache
    from bdlab.models.classifier import Classifier

STAMP_CHUNK = 4096


@dataclass(frozen=True)
class PoisonedSet(ImageSet):
    """A training set as the attacker hands it over: images, (relabelled) labels, poison flags."""

    is_poison: Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.is_poison is None or self.is_poison.shape != self.labels.shape or self.is_poison.dtype != torch.bool:
            raise ValueError("is_poison must be a bool tensor with one flag per image")


class CleanModels(Protocol):
    """Clean models of the run's data and recipe trained with other seeds (surrogate ensembles)."""

    def key(self, seed: int) -> str:
        """The cache key of the clean model trained with ``seed`` (cheap: nothing is loaded)."""

    def model(self, seed: int) -> Classifier:
        """The clean model trained with ``seed``, from the cache or trained on first use and stored."""


class Attack(ABC):
    """Base of every attack (TrojanZoo's taxonomy; DESIGN.md "Attack").

    Args:
        poison_rate: fraction of the training set replaced by poisoned samples, drawn from
            non-target classes (dirty-label); for clean-label attacks, the fraction of the
            target class that is poisoned. Default 0.1.
        target_class: the class every poisoned input should be classified as. Default 0.
        seed: fixes the poison indices and any random trigger.
        enhance: the transformation-based enhancement of the ShrinkPad paper (section 4.2,
            Eq. 5; Appendix C): every training image of the trojaned model, benign and
            poisoned alike, goes through a random left-right flip and then a random ShrinkPad
            whose shrink size is drawn from ``{0, ..., enhance_max_shrink}``. Default False;
            shown as ``<name>+`` (e.g. ``badnets+``).
        enhance_max_shrink: the enhancement's maximal shrink size in pixels (default 4, the paper's).

    Subclasses build their trigger in :meth:`setup` (which sees the dataset's shape) and
    stamp float batches in ``[0, 1]`` in :meth:`apply`, vectorised, on any device.
    """

    name = "attack"
    clean_label = False
    # True for attacks that craft their poisons on the clean reference model (use_clean_model)
    needs_clean_model = False

    def __init__(self, poison_rate: float = 0.1, target_class: int = 0, seed: int = 0, enhance: bool = False,
                 enhance_max_shrink: int = 4) -> None:
        check_range("attack.poison_rate", poison_rate, 0.0, 1.0, low_open=True)
        if enhance_max_shrink < 0:
            raise ConfigError("attack.enhance_max_shrink", f"got {enhance_max_shrink}, must be >= 0")
        self.poison_rate = poison_rate
        self.target_class = target_class
        self.seed = seed
        self.enhance = bool(enhance)
        self.enhance_max_shrink = int(enhance_max_shrink)

    def setup(self, data: DatasetSplits) -> None:
        """Validate against the dataset and build the trigger; raises ConfigError before any training."""
        if not 0 <= self.target_class < data.num_classes:
            raise ConfigError("attack.target_class", f"got {self.target_class}, must be in [0, {data.num_classes - 1}] "
                              f"for {data.name}")
        if self.enhance:
            check_shrink("attack.enhance_max_shrink", self.enhance_max_shrink, data.size)
        self.poison_indices(data.train.labels)  # checks the rate leaves enough candidates

    @abstractmethod
    def apply(self, x: Tensor) -> Tensor:
        """Stamp the trigger on a float batch ``(N, C, H, W)`` in ``[0, 1]``; returns a new tensor."""

    @property
    def display_name(self) -> str:
        """The name results and tables show for this attack (``+`` marks the enhancement)."""
        return f"{self.name}+" if self.enhance else self.name

    def train_transform(self, x: Tensor) -> Tensor:
        """A batched transform applied to *every* training image of the trojaned model, after the
        dataset's augmentation: the enhancement's random flip + random ShrinkPad when ``enhance``
        is set (the global RNG, seeded by the training recipe, draws it), identity otherwise."""
        if not self.enhance:
            return x
        return random_shrink_pad(random_flip(x), self.enhance_max_shrink)

    def use_clean_model(self, model: Classifier, cache: ArtifactCache, model_key: str,
                        other_seeds: CleanModels | None = None) -> None:
        """Called by the pipeline before poisoning with the clean reference model (same data, recipe
        and seed), the artifact cache, that model's cache key and ``other_seeds``, the clean models
        of other training seeds. Attacks that craft their poisons on clean surrogates
        (label-consistent) keep them; the others ignore the call."""

    @property
    def trigger_mask(self) -> Tensor | None:
        """``(H, W)`` bool mask of the pixels the trigger may change, or None for image-wide triggers."""
        return None

    def poison_indices(self, labels: Tensor) -> Tensor:
        """The fixed, seeded, sorted indices of the training samples to poison."""
        if self.clean_label:
            candidates = (labels == self.target_class).nonzero().flatten()
        else:
            candidates = (labels != self.target_class).nonzero().flatten()
        base = len(candidates) if self.clean_label else len(labels)
        count = int(round(self.poison_rate * base))
        if count > len(candidates):
            raise ConfigError("attack.poison_rate", f"{self.poison_rate} asks for {count} poisoned samples but only "
                              f"{len(candidates)} lie outside the target class; use at most "
                              f"{len(candidates) / len(labels):.3f}")
        if count == 0:
            raise ConfigError("attack.poison_rate", f"{self.poison_rate} poisons no sample of {base}; raise it")
        generator = torch.Generator().manual_seed(self.seed)
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        return chosen.sort().values

    def stamp(self, images: Tensor, device: torch.device | str = "cpu") -> Tensor:
        """Stamp uint8 images in chunks on ``device``; returns uint8 on the input's device."""
        out = torch.empty_like(images)
        for start in range(0, len(images), STAMP_CHUNK):
            chunk = images[start:start + STAMP_CHUNK].to(device)
            out[start:start + STAMP_CHUNK] = to_uint8(self.apply(to_float(chunk))).to(images.device)
        return out

    def poison_train(self, train: ImageSet, device: torch.device | str = "cpu") -> PoisonedSet:
        """Replace the poison samples by stamped, relabelled copies (labels kept for clean-label)."""
        index = self.poison_indices(train.labels)
        images, labels = train.images.clone(), train.labels.clone()
        images[index] = self.stamp(train.images[index], device)
        if not self.clean_label:
            labels[index] = self.target_class
        flags = torch.zeros(len(train), dtype=torch.bool)
        flags[index] = True
        return PoisonedSet(images, labels, flags)

    def poison_test(self, test: ImageSet, device: torch.device | str = "cpu") -> ImageSet:
        """Stamped copies of the test images whose true label is not the target; labels stay the true ones."""
        keep = (test.labels != self.target_class).nonzero().flatten()
        return ImageSet(self.stamp(test.images[keep], device), test.labels[keep])


class NoAttack(Attack):
    """No backdoor: the trojaned model is the clean reference and attack metrics are not reported."""

    name = "none"

    def __init__(self, **_: Any) -> None:
        super().__init__(poison_rate=1.0)

    def setup(self, data: DatasetSplits) -> None:
        """Nothing to validate: there is no trigger and no poisoned sample."""

    def apply(self, x: Tensor) -> Tensor:
        return x.clone()


class MaskPatternAttack(Attack):
    """An attack whose trigger is ``x' = (1 - m) * x + m * p`` for a fixed mask ``m`` and pattern ``p``.

    BadNets (``m`` = 1 on a patch) and Blended (``m`` = alpha everywhere) are both of this form.
    Subclasses set ``self.mask`` ``(1, H, W)`` and ``self.pattern`` ``(C, H, W)`` in ``setup``.
    """

    mask: Tensor
    pattern: Tensor

    def apply(self, x: Tensor) -> Tensor:
        mask = self.mask.to(x.device, x.dtype)
        return x + mask * (self.pattern.to(x.device, x.dtype) - x)

    @property
    def trigger_mask(self) -> Tensor:
        return self.mask[0] > 0
