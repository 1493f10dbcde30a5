"""The attack base class: seeded poison indices, batched stamping, relabelling, poisoned sets, and the
seams through which an attack changes training (docs/extending.md)."""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
from torch import Tensor

from bdlab.datasets.base import DatasetSplits, ImageSet, PoisonedTestSet, to_float, to_uint8
from bdlab.errors import ConfigError, check_range
from bdlab.services import RunServices
from bdlab.training.hooks import TrainingHooks
from bdlab.training.loader import TensorBatches
from bdlab.training.recipe import TrainingRecipe
from bdlab.training.victim import BatchTransform, CoOptimisationModule, VictimModule, split_cross_entropy
from bdlab.transforms import check_shrink, random_flip, random_shrink_pad

if TYPE_CHECKING:
    from bdlab.models.classifier import Classifier

STAMP_CHUNK = 4096


#: where the trojaned model's training starts (TrojanZoo §6.2 RQ4, Table 17)
INITS = ("clean", "scratch")
#: how poisoned and clean inputs are mixed in training (TrojanZoo §6.2 RQ6, Table 18)
MIXINGS = ("dataset", "batch", "loss")
#: the fields of TrojanZoo §6's explorations an attack's name shows when they differ from its defaults
SWITCHES = ("trigger_shape", "init", "mixing", "mixing_weight")


def check_init(init: str, allowed: tuple[str, ...] = INITS) -> str:
    """The ``attack.init`` value, or one ConfigError line."""
    if init not in allowed:
        raise ConfigError("attack.init", f"got {init!r}, must be one of {', '.join(allowed)}")
    return init


def check_mixing(mixing: str, mixing_weight: float) -> tuple[str, float]:
    """``attack.mixing`` and ``attack.mixing_weight``, or one ConfigError line."""
    if mixing not in MIXINGS:
        raise ConfigError("attack.mixing", f"got {mixing!r}, must be one of {', '.join(MIXINGS)}")
    if isinstance(mixing_weight, bool) or not isinstance(mixing_weight, (int, float)) \
            or not (math.isfinite(mixing_weight) and mixing_weight >= 0):
        raise ConfigError("attack.mixing_weight", f"got {mixing_weight!r}, must be a finite number >= 0 (lambda of "
                          "L_clean + lambda L_poison; TrojanZoo: 0.01)")
    return mixing, float(mixing_weight)


def constructor_default(cls: type, field: str) -> Any:
    """The default of ``field`` in the first constructor along ``cls``'s MRO that declares it."""
    for klass in cls.__mro__:
        parameter = inspect.signature(klass.__init__).parameters.get(field) if "__init__" in vars(klass) else None
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            return parameter.default
    raise KeyError(field)


def map_batches(function: Callable[[Tensor, slice], Tensor], images: Tensor,
                device: torch.device | str = "cpu", chunk: int = STAMP_CHUNK) -> Tensor:
    """``function`` over uint8 ``images`` in chunks on ``device``: it gets each chunk as float in
    ``[0, 1]`` with its slice of the set and returns float images; the result is uint8 on the
    input's device. Every attack that stamps or perturbs a whole set goes through here."""
    out = torch.empty_like(images)
    for start in range(0, len(images), chunk):
        part = slice(start, start + chunk)
        out[part] = to_uint8(function(to_float(images[part].to(device)), part)).to(images.device)
    return out


def blend(x: Tensor, mask: Tensor, pattern: Tensor) -> Tensor:
    """The mask-and-pattern trigger ``x' = (1 - m) x + m p`` (TrojanZoo Eq. 1 with ``m`` the opacity)."""
    mask, pattern = mask.to(x.device, x.dtype), pattern.to(x.device, x.dtype)
    return x + mask * (pattern - x)


@dataclass(frozen=True)
class PoisonedSet(ImageSet):
    """A training set as the attacker hands it over: images, (relabelled) labels, poison flags."""

    is_poison: Tensor = None  # type: ignore[assignment]
    #: batch- and loss-level mixing (TrojanZoo RQ6): the poisoned copies are appended after the clean
    #: images, and ``pairs[i]`` is the index of the clean image the i-th copy was made from (the loader
    #: puts each copy in its source's batch); None for a set mixed at the dataset level
    pairs: Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.is_poison is None or self.is_poison.shape != self.labels.shape or self.is_poison.dtype != torch.bool:
            raise ValueError("is_poison must be a bool tensor with one flag per image")
        if self.pairs is not None and not (len(self.pairs) <= len(self) and bool(
                self.is_poison[len(self) - len(self.pairs):].all())):
            raise ValueError("pairs must name one source per appended (flagged) copy")


class Attack(TrainingHooks, ABC):
    """Base of every attack (TrojanZoo's taxonomy; docs/extending.md).

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
        init: where the trojaned model's training starts (TrojanZoo §6.2 RQ4, Table 17): ``scratch``
            (default; fresh weights, the same the clean reference starts from) or ``clean`` (the clean
            reference's trained weights, fine-tuned: retraining a benign model).
        mixing: how poisoned and clean inputs are mixed in training (TrojanZoo §6.2 RQ6, Table 18):
            ``dataset`` (default) replaces the poisoned samples in the training set, which is then
            shuffled; ``batch`` keeps every clean image and adds each poisoned copy to the batch of
            its clean version; ``loss`` composes batches as ``batch`` does and trains on
            ``L_clean + mixing_weight * L_poison``, the mean cross-entropies of the clean and the
            poisoned inputs of the batch.
        mixing_weight: lambda of the loss-level mixing, ``>= 0`` (default 0.01, TrojanZoo's); other
            mixings do not read it.

    Subclasses build their trigger in :meth:`setup` (which sees the dataset's shape) and
    stamp float batches in ``[0, 1]`` in :meth:`apply`, vectorised, on any device. An attack
    that changes training overrides the :class:`~bdlab.training.hooks.TrainingHooks` it needs,
    or :meth:`training_module` altogether; state it learns goes in :meth:`state_dict`, which
    the pipeline stores with the trojaned model and restores on a cache hit before the poisoned
    test set is built.
    """

    name = "attack"
    clean_label = False
    #: poisoned training images are stamped per batch during training (the trigger changes), not once
    stamps_per_batch = False
    #: the ``init`` values this attack can start from
    inits: tuple[str, ...] = INITS
    #: fields added after models were cached: the cache key (services.model_spec) holds one only when it
    #: differs from its constructor default, so the models cached before keep their keys
    late_fields: tuple[str, ...] = ("init", "mixing", "mixing_weight", "trigger_shape")
    #: the run trains the trojaned model from a poisoned training set (False: the model is given, and no
    #: training set exists for data filtering or retraining)
    trains = True
    #: the target class is known (False: metrics of the target are not applicable)
    known_target = True
    #: (results.json key, title) of the metrics the report shows for every attack
    headline_metrics: tuple[tuple[str, str], ...] = (
        ("trojan/acc", "ACC of the trojaned model (%)"),
        ("trojan/asr", "ASR (%)"),
        ("attack/cad", "CAD of the attack (clean ACC - trojaned ACC, points)"),
        ("attack/psnr", "PSNR of poisoned vs clean test images (dB, higher is stealthier)"),
        ("attack/linf", "L-inf change (grey levels, 0-255)"),
        ("trojan/nsr", "NSR of the trojaned model (penultimate layer, top 10%; TrojanZoo Table 16)"),
    )

    def __init__(self, poison_rate: float = 0.1, target_class: int = 0, seed: int = 0, enhance: bool = False,
                 enhance_max_shrink: int = 4, init: str = "scratch", mixing: str = "dataset",
                 mixing_weight: float = 0.01) -> None:
        check_range("attack.poison_rate", poison_rate, 0.0, 1.0, low_open=True)
        if enhance_max_shrink < 0:
            raise ConfigError("attack.enhance_max_shrink", f"got {enhance_max_shrink}, must be >= 0")
        self.init = check_init(init, self.inits)
        self.mixing, self.mixing_weight = check_mixing(mixing, mixing_weight)
        self.poison_rate = poison_rate
        self.target_class = target_class
        self.seed = seed
        self.enhance = bool(enhance)
        self.enhance_max_shrink = int(enhance_max_shrink)
        self._resources: RunServices | None = None
        self.is_set_up = False

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        """Validate against the dataset and build the trigger; raises ConfigError before any training.

        ``resources`` (the run's :class:`~bdlab.services.RunServices`: cache, device, clean models) are
        kept for the attack's later steps; nothing is trained or loaded here."""
        self._resources = resources
        if not 0 <= self.target_class < data.num_classes:
            raise ConfigError("attack.target_class", f"got {self.target_class}, must be in [0, {data.num_classes - 1}] "
                              f"for {data.name}")
        if self.enhance:
            check_shrink("attack.enhance_max_shrink", self.enhance_max_shrink, data.size)
        self.poison_indices(data.train.labels)  # checks the rate leaves enough candidates
        self.is_set_up = True

    @property
    def resources(self) -> RunServices:
        """The run's resources given to :meth:`setup`."""
        if self._resources is None:
            raise RuntimeError(f"attack {self.name!r} needs the run's resources: pass them to setup(data, resources)")
        return self._resources

    @abstractmethod
    def apply(self, x: Tensor) -> Tensor:
        """Stamp the trigger on a float batch ``(N, C, H, W)`` in ``[0, 1]``; returns a new tensor."""

    @property
    def has_poisoned_test(self) -> bool:
        """Whether the run has triggered test inputs (ASR, TPR, NSR need them)."""
        return True

    @property
    def display_name(self) -> str:
        """The name results and tables show for this attack: ``+`` marks the enhancement, and the §6
        switches away from their defaults follow in brackets (``badnets[mixing=batch]``), so the report
        keeps the variants apart."""
        name = f"{self.name}+" if self.enhance else self.name
        changed = [f"{key}={getattr(self, key)}" for key in SWITCHES
                   if hasattr(self, key) and getattr(self, key) != constructor_default(type(self), key)]
        return f"{name}[{','.join(changed)}]" if changed else name

    def train_transform(self, x: Tensor) -> Tensor:
        """The enhancement's random flip + random ShrinkPad on every training image of the trojaned
        model, after the dataset's augmentation, when ``enhance`` is set (the global RNG, seeded by
        the training recipe, draws it); identity otherwise."""
        if not self.enhance:
            return x
        return random_shrink_pad(random_flip(x), self.enhance_max_shrink)

    @property
    def trigger_mask(self) -> Tensor | None:
        """``(H, W)`` bool mask of the pixels the trigger changes (all of them for image-wide blends), or
        None for triggers that are not one fixed set of pixels (per-sample or randomly placed)."""
        return None

    @property
    def trigger_pattern(self) -> Tensor | None:
        """``(C, H, W)`` pixel values in ``[0, 1]`` the trigger writes inside :attr:`trigger_mask`, or None."""
        return None

    def poison_indices(self, labels: Tensor) -> Tensor:
        """The fixed, seeded, sorted indices of the training samples to poison."""
        if self.clean_label:
            candidates = (labels == self.target_class).nonzero().flatten()
        else:
            candidates = (labels != self.target_class).nonzero().flatten()
        base = len(candidates) if self.clean_label else len(labels)
        count = round(self.poison_rate * base)
        if count > len(candidates):
            raise ConfigError("attack.poison_rate", f"{self.poison_rate} asks for {count} poisoned samples but only "
                              f"{len(candidates)} lie outside the target class; use at most "
                              f"{len(candidates) / len(labels):.3f}")
        if count == 0:
            raise ConfigError("attack.poison_rate", f"{self.poison_rate} poisons no sample of {base}; raise it")
        generator = torch.Generator().manual_seed(self.seed)
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        return chosen.sort().values

    def require_setup(self) -> None:
        """Raise one line unless :meth:`setup` has run (the data fixes the trigger's size and channels)."""
        if not self.is_set_up:
            raise RuntimeError(f"attack {self.name!r} is not set up: call setup(data) first, or use "
                               f"bdlab.attack({self.name!r}).poison(data)")

    def stamp(self, images: Tensor, device: torch.device | str = "cpu") -> Tensor:
        """Stamp uint8 images in chunks on ``device``; returns uint8 on the input's device."""
        self.require_setup()
        return map_batches(lambda x, _: self.apply(x), images, device)

    def relabelled(self, train: ImageSet, images: Tensor) -> PoisonedSet:
        """``images`` with the poison samples' labels set to the target (kept for clean-label) and their flags."""
        index = self.poison_indices(train.labels)
        labels = train.labels.clone()
        if not self.clean_label:
            labels[index] = self.target_class
        flags = torch.zeros(len(train), dtype=torch.bool)
        flags[index] = True
        return PoisonedSet(images, labels, flags)

    def poison_train(self, train: ImageSet, device: torch.device | str = "cpu") -> PoisonedSet:
        """The poisoned training set the attacker hands over: the poison samples replaced by stamped,
        relabelled copies (labels kept for clean-label), stamped with the current (learned) trigger."""
        index = self.poison_indices(train.labels)
        images = train.images.clone()
        images[index] = self.stamp(train.images[index], device)
        return self.relabelled(train, images)

    def training_set(self, train: ImageSet, device: torch.device | str = "cpu") -> PoisonedSet:
        """What the training module gets: :meth:`poison_train`'s set, or, for attacks that stamp per
        batch, the clean images with the poison samples relabelled and flagged; mixed at the batch or
        loss level (``mixing``), :meth:`paired`'s."""
        if self.stamps_per_batch:
            mixed = self.relabelled(train, train.images)
        else:
            mixed = self.poison_train(train, device)
        return mixed if self.mixing == "dataset" else self.paired(train, mixed)

    @staticmethod
    def paired(train: ImageSet, mixed: PoisonedSet) -> PoisonedSet:
        """Every clean training image, then a copy of each flagged sample of the dataset-level set
        ``mixed`` (stamped, or stamped per batch), flagged, with its source in ``pairs`` so that the
        loader puts each copy in the batch of its clean version (TrojanZoo RQ6's batch level)."""
        sources = mixed.is_poison.nonzero().flatten()
        flags = torch.cat([torch.zeros(len(train), dtype=torch.bool), torch.ones(len(sources), dtype=torch.bool)])
        return PoisonedSet(torch.cat([train.images, mixed.images[sources]]),
                           torch.cat([train.labels, mixed.labels[sources]]), flags, pairs=sources)

    def classification_loss(self, logits: Tensor, labels: Tensor, is_poison: Tensor) -> Tensor:
        """Loss-level mixing: ``L_clean + mixing_weight * L_poison`` (TrojanZoo §6.2 RQ6); otherwise
        the cross-entropy over the batch."""
        if self.mixing != "loss":
            return super().classification_loss(logits, labels, is_poison)
        clean, poison = split_cross_entropy(logits, labels, is_poison)
        return clean + self.mixing_weight * poison

    def test_sources(self, test: ImageSet) -> Tensor:
        """Indices of the test images :meth:`poison_test` stamps, in its order: those whose true label is
        not the target. Stealthiness compares each poisoned test image with its source."""
        return (test.labels != self.target_class).nonzero().flatten()

    def poison_test(self, test: ImageSet, device: torch.device | str = "cpu") -> PoisonedTestSet:
        """Stamped copies of the test images whose true label is not the target; labels stay the true ones,
        and each carries the index of its source image."""
        keep = self.test_sources(test)
        return PoisonedTestSet(self.stamp(test.images[keep], device), test.labels[keep], keep)

    def report(self, test: ImageSet, poisoned_test: ImageSet, device: torch.device | str = "cpu") -> dict[str, float]:
        """Metrics only this attack has (``attack/...``, e.g. a decoder's bit accuracy), computed after
        training from the clean and poisoned test sets; none by default."""
        return {}

    def stamp_training(self, x: Tensor) -> Tensor:
        """The trigger on the flagged images of a training batch (attacks that stamp per batch)."""
        return self.apply(x)

    def poison_batch(self, x: Tensor, labels: Tensor, is_poison: Tensor) -> tuple[Tensor, Tensor]:
        if not self.stamps_per_batch or not bool(is_poison.any()):
            return x, labels
        x = x.clone()
        x[is_poison] = self.stamp_training(x[is_poison])
        return x, labels

    def model_shell(self, fresh: Classifier) -> Classifier:
        """The trojaned model's architecture around a freshly initialised classifier (the victim's
        own by default; an attack that adds modules wraps it). Cached weights are loaded into it."""
        return fresh

    def initial_model(self, fresh: Classifier) -> Classifier:
        """The model training starts from: :meth:`model_shell` of the fresh classifier, which holds the
        clean reference model's weights when :attr:`init` is ``clean`` (modules a shell adds start
        fresh either way)."""
        if self.init == "clean":
            fresh.load_state_dict(self.resources.clean_model().state_dict())
        return self.model_shell(fresh)

    def training_module(self, model: Classifier, batches: TensorBatches, recipe: TrainingRecipe,
                        augment: BatchTransform | None, name: str) -> pl.LightningModule:
        """The LightningModule that trains the trojaned model: the victim module with this attack's
        hooks, or the co-optimisation module when the attack has auxiliaries."""
        module = CoOptimisationModule if self.auxiliaries() else VictimModule
        return module(model, batches, recipe, augment, hooks=self, name=name)

    @classmethod
    def cache_fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """``fields`` (the attack's config) less the :attr:`late_fields` at their constructor default:
        what of it enters the trojaned model's cache key."""
        def at_default(key: str) -> bool:
            try:
                return fields[key] == constructor_default(cls, key)
            except KeyError:
                return False
        return {key: value for key, value in fields.items() if not (key in cls.late_fields and at_default(key))}

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors the attack learned while poisoning or training (a trigger, a generator), stored in
        the trojaned model's cache entry; empty for attacks that learn nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`'s tensors; raises KeyError when one is missing (the pipeline
        then rebuilds the cache entry instead of misreading it)."""


class NoAttack(Attack):
    """No backdoor: the trojaned model is the clean reference and attack metrics are not reported."""

    name = "none"
    known_target = False
    has_poisoned_test = False  # type: ignore[assignment]
    headline_metrics = (("trojan/acc", "ACC of the trojaned model (%)"),)

    def __init__(self, **_: Any) -> None:
        super().__init__(poison_rate=1.0)

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        """Nothing to validate: there is no trigger and no poisoned sample."""
        self._resources, self.is_set_up = resources, True

    def apply(self, x: Tensor) -> Tensor:
        return x.clone()


class MaskPatternAttack(Attack):
    """An attack whose trigger is ``x' = (1 - m) * x + m * p`` for a mask ``m`` and pattern ``p``
    (TrojanZoo Eq. 1).

    BadNets (``m`` = 1 on a patch) and Blended (``m`` = alpha everywhere) are both of this form,
    and so are the attacks that learn their pattern (TrojanNN, latent backdoor, IMC).
    Subclasses set ``self.mask`` ``(1, H, W)`` and ``self.pattern`` ``(C, H, W)`` in ``setup``.
    """

    mask: Tensor
    pattern: Tensor

    def apply(self, x: Tensor) -> Tensor:
        return blend(x, self.mask, self.pattern)

    @property
    def trigger_mask(self) -> Tensor:
        return self.mask[0] > 0

    @property
    def trigger_pattern(self) -> Tensor:
        return self.pattern
