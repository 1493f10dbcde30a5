"""TrojanNN (Liu et al., NDSS 2018): a trigger optimised to excite selected internal neurons, then
retraining on the poisoned set (TrojanZoo's "Tnn", Table 2: partially optimised trigger)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from bdlab.attacks.badnets import BadNets
from bdlab.attacks.base import Attack, PoisonedSet, blend
from bdlab.datasets.base import DatasetSplits, ImageSet, to_float
from bdlab.errors import ConfigError, check_at_least, check_range
from bdlab.models.classifier import PENULTIMATE, Classifier
from bdlab.services import RunServices

log = logging.getLogger(__name__)

def neuron_scores(model: Classifier, layer: str) -> Tensor:
    """How strongly each neuron of ``layer`` is connected (TrojanNN's neuron selection).

    ``penultimate``: the summed absolute weights from each penultimate feature to the logits
    (TrojanZoo's rule: the next layer's weights). A named Linear or convolution: the summed
    absolute weights into each of its output units or channels (Liu et al. §4.2).
    """
    if layer == PENULTIMATE:
        return model.last_linear().weight.detach().abs().sum(0)
    weight = dict(model.net.named_modules())[layer].weight.detach().abs()
    return weight.flatten(1).sum(1)


def neuron_activations(model: Classifier, x: Tensor, layer: str) -> Tensor:
    """``(N, units)`` activations of ``layer``: a convolution's channels averaged over space."""
    out = model.features(x, layer)
    return out.mean((2, 3)) if out.dim() == 4 else out.flatten(1)


def check_neuron_layer(field: str, model: Classifier, layer: str) -> int:
    """Refuse layers that do not exist or have no weights to select neurons by; returns their unit count."""
    model.check_layer(field, layer)
    if layer != PENULTIMATE:
        weight = getattr(dict(model.net.named_modules())[layer], "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            raise ConfigError(field, f"layer {layer!r} has no Linear or convolution weights to select neurons by; "
                              "name a Linear or Conv layer, or use penultimate")
    return len(neuron_scores(model, layer))


def excite_neurons(model: Classifier, x: Tensor, mask: Tensor, pattern: Tensor, layer: str, neurons: Tensor,
                   target_value: float, lr: float, iterations: int, threshold: float) -> tuple[Tensor, float]:
    """Liu et al.'s trigger generation: signed-gradient (PGD) steps of ``lr`` on ``pattern`` inside
    ``mask`` so that the stamped images drive ``neurons`` to ``target_value``; the loss is the mean
    over images of ``|| a_neurons(x (+) r) - target_value ||_2``. Stops after ``iterations`` steps
    or once the loss is below ``threshold``. Returns the pattern and its final loss."""
    model.eval()
    inside = (mask > 0).to(pattern.dtype)
    pattern = pattern.clone()
    loss = torch.tensor(float("inf"))
    for _ in range(iterations):
        pattern.requires_grad_(True)
        activations = neuron_activations(model, blend(x, mask, pattern), layer)[:, neurons]
        loss = (activations - target_value).norm(dim=1).mean()
        if loss.item() < threshold:
            break
        (grad,) = torch.autograd.grad(loss, pattern)
        with torch.no_grad():
            pattern = (pattern - lr * grad.sign() * inside).clamp_(0.0, 1.0)
    return pattern.detach(), float(loss.detach())


class TrojanNN(BadNets):
    """TrojanNN (Liu et al., "Trojaning Attack on Neural Networks", NDSS 2018; TrojanZoo §4.1 "Tnn").

    1. Neuron selection: the ``neuron_count`` neurons of ``layer`` with the largest connection
       weights (:func:`neuron_scores`), read off the clean reference model.
    2. Trigger generation: the pattern inside BadNets' patch (``patch_size``, ``position``,
       ``margin``; opacity ``alpha``) starts from seeded uniform noise and is optimised on the
       clean model by :func:`excite_neurons` over ``preprocess_images`` clean non-target
       training images, until the selected neurons fire at ``target_value``.
    3. Retraining: the trojaned model trains on the poisoned set (the pattern stamped on
       ``poison_rate`` of the training set, relabelled), starting from the clean reference's
       weights (``init: clean``, TrojanZoo's retraining) or from scratch (``init: scratch``).

    The learned pattern is stored with the trojaned model and restored on a cache hit.

    Args:
        layer: ``penultimate`` (default, TrojanZoo's preprocess layer) or a Linear/Conv layer name.
        neuron_count: neurons to excite (default 2).
        target_value: activation the neurons are driven to (default 10).
        preprocess_lr: PGD step in pixel units (default 0.015).
        preprocess_iter: PGD steps (default 20).
        threshold: the optimisation stops once the loss is below this (default 5).
        preprocess_images: clean non-target training images the trigger is optimised on (default 1000).
        init: ``clean`` (default) or ``scratch``, see above.
        patch_size, position, margin, alpha, poison_rate, target_class, seed, enhance,
            enhance_max_shrink: see :class:`~bdlab.attacks.badnets.BadNets` (TrojanZoo Table 20 for the rest).
    """

    name = "trojannn"
    # init was in its config (default clean) before the other attacks had it: always in the cache key
    late_fields = tuple(field for field in Attack.late_fields if field != "init")

    def __init__(self, layer: str = PENULTIMATE, neuron_count: int = 2, target_value: float = 10.0,
                 preprocess_lr: float = 0.015, preprocess_iter: int = 20, threshold: float = 5.0,
                 preprocess_images: int = 1000, init: str = "clean", **kwargs: Any) -> None:
        super().__init__(init=init, **kwargs)
        check_at_least("attack.neuron_count", neuron_count, 1)
        check_range("attack.preprocess_lr", preprocess_lr, 0.0, 1.0, low_open=True)
        check_at_least("attack.preprocess_iter", preprocess_iter, 0)
        check_at_least("attack.threshold", threshold, 0)
        check_at_least("attack.preprocess_images", preprocess_images, 1)
        self.layer, self.neuron_count, self.target_value = layer, int(neuron_count), float(target_value)
        self.preprocess_lr, self.preprocess_iter = float(preprocess_lr), int(preprocess_iter)
        self.threshold, self.preprocess_images = float(threshold), int(preprocess_images)
        self.trigger_loss = float("nan")

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        super().setup(data, resources)
        if resources is not None:
            units = check_neuron_layer("attack.layer", resources.fresh_model(), self.layer)
            if self.neuron_count > units:
                raise ConfigError("attack.neuron_count", f"got {self.neuron_count}, but layer {self.layer!r} has "
                                  f"{units} neurons")
        generator = torch.Generator().manual_seed(self.seed)
        self.pattern = torch.rand(self.pattern.shape, generator=generator) * (self.mask > 0)

    def optimisation_images(self, train: ImageSet) -> Tensor:
        """A seeded sample of clean non-target training images (uint8)."""
        candidates = (train.labels != self.target_class).nonzero().flatten()
        generator = torch.Generator().manual_seed(self.seed + 2)
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:self.preprocess_images]]
        return train.images[chosen.sort().values]

    def learn_trigger(self, train: ImageSet, device: torch.device | str) -> None:
        """Steps 1 and 2 of the class docstring, on the clean reference model."""
        model = self.resources.clean_model()
        neurons = neuron_scores(model, self.layer).argsort(descending=True)[:self.neuron_count]
        x = to_float(self.optimisation_images(train).to(device))
        pattern, self.trigger_loss = excite_neurons(model, x, self.mask.to(device), self.pattern.to(device),
                                                    self.layer, neurons.to(device), self.target_value,
                                                    self.preprocess_lr, self.preprocess_iter, self.threshold)
        self.pattern = pattern.cpu()
        log.info("%s trigger: neurons %s of %s driven towards %g, loss %.3g", self.name, neurons.tolist(), self.layer,
                 self.target_value, self.trigger_loss)

    def training_set(self, train: ImageSet, device: torch.device | str = "cpu") -> PoisonedSet:
        self.learn_trigger(train, device)
        return super().training_set(train, device)

    def state_dict(self) -> dict[str, Tensor]:
        return {"pattern": self.pattern}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.pattern = state["pattern"].detach().cpu().clone()
