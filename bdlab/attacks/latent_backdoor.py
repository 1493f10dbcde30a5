"""Latent backdoor (Yao et al., CCS 2019): the trigger is optimised so that triggered inputs look like
the target class in a hidden layer, and training keeps them there (TrojanZoo's "Lb")."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.nn import functional as F

from bdlab.attacks.badnets import BadNets
from bdlab.attacks.base import Attack, PoisonedSet, blend
from bdlab.datasets.base import DatasetSplits, ImageSet, to_float
from bdlab.errors import ConfigError, check_at_least, check_range
from bdlab.evaluate import predict
from bdlab.models.classifier import PENULTIMATE, Classifier
from bdlab.services import RunServices
from bdlab.training.hooks import Batch
from bdlab.training.loader import TensorBatches
from bdlab.training.recipe import TrainingRecipe
from bdlab.training.victim import BatchTransform

log = logging.getLogger(__name__)

def mean_features(model: Classifier, images: Tensor, layer: str) -> Tensor:
    """The mean activation vector of ``layer`` (flattened) over uint8 ``images``, in eval mode (the
    model's mode is restored: it is called between training epochs)."""
    training = model.training
    features = predict(model, images, layers=layer).flatten(1)
    model.train(training)
    return features.sum(0) / len(images)  # outside inference mode: a plain tensor the latent loss can keep


def latent_trigger(model: Classifier, x: Tensor, mask: Tensor, pattern: Tensor, layer: str, target_features: Tensor,
                   lr: float, iterations: int) -> tuple[Tensor, float]:
    """Yao et al.'s trigger generation (§4.2, Eq. 2 with the mean target representation, as TrojanZoo):
    Adam on ``w`` with ``pattern = (tanh(w) + 1) / 2`` (tanh keeps it in ``[0, 1]``), minimising the
    mean squared distance between ``layer``'s features of the stamped images and ``target_features``.
    Returns the pattern and its final loss."""
    model.eval()
    inside = (mask > 0).to(pattern.dtype)
    w = torch.atanh(pattern.clamp(1e-4, 1 - 1e-4) * 2 - 1).requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=lr)
    loss = torch.tensor(float("nan"))
    for _ in range(iterations):
        current = ((torch.tanh(w) + 1) / 2) * inside
        loss = F.mse_loss(model.features(blend(x, mask, current), layer).flatten(1),
                          target_features.expand(len(x), -1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return ((torch.tanh(w) + 1) / 2 * inside).detach(), float(loss)


class LatentBackdoor(BadNets):
    """Latent backdoor (Yao, Li, Zheng and Zhao, "Latent Backdoor Attacks on Deep Neural Networks", CCS
    2019; TrojanZoo §4.1 "Lb": ``l(g(x (+) r), t) = Delta(g(x (+) r), phi_t)``).

    1. On the clean reference model, ``phi_t`` is the mean ``layer`` representation of up to
       ``samples_per_class`` target-class training images, and the pattern inside BadNets' patch
       is optimised (:func:`latent_trigger`, ``preprocess_iter`` Adam steps of ``preprocess_lr``)
       so that the stamped non-target images' representations match it.
    2. The trojaned model (from the clean reference's weights with ``init: clean``, TrojanZoo's
       retraining, or from scratch) trains on the poisoned set with the cross-entropy plus
       ``mse_weight`` times the mean squared distance between the poisoned samples' ``layer``
       representations and ``phi_t`` (the latent loss, kept during training).

    The pattern and ``phi_t`` are stored with the trojaned model and restored on a cache hit.

    Args:
        layer: the representation matched (default ``penultimate``, TrojanZoo's); any layer name.
        preprocess_lr: Adam learning rate of the trigger (default 0.1).
        preprocess_iter: Adam steps (default 100).
        samples_per_class: target-class images for ``phi_t`` and non-target images for the
            trigger (default 1000).
        mse_weight: weight of the latent loss in training (default 0.5); must be >= 0.
        init: ``clean`` (default) or ``scratch``.
        patch_size, position, margin, alpha, poison_rate, target_class, seed, enhance,
            enhance_max_shrink: see :class:`~bdlab.attacks.badnets.BadNets` (TrojanZoo Table 20 for the rest).
    """

    name = "latent_backdoor"
    # init was in its config (default clean) before the other attacks had it: always in the cache key
    late_fields = tuple(field for field in Attack.late_fields if field != "init")

    def __init__(self, layer: str = PENULTIMATE, preprocess_lr: float = 0.1, preprocess_iter: int = 100,
                 samples_per_class: int = 1000, mse_weight: float = 0.5, init: str = "clean", **kwargs: Any) -> None:
        super().__init__(init=init, **kwargs)
        check_range("attack.preprocess_lr", preprocess_lr, 0.0, 10.0, low_open=True)
        check_at_least("attack.preprocess_iter", preprocess_iter, 0)
        check_at_least("attack.samples_per_class", samples_per_class, 1)
        if not mse_weight >= 0:
            raise ConfigError("attack.mse_weight", f"got {mse_weight}, the latent loss weight must be >= 0")
        self.layer, self.preprocess_lr, self.preprocess_iter = layer, float(preprocess_lr), int(preprocess_iter)
        self.samples_per_class, self.mse_weight = int(samples_per_class), float(mse_weight)
        self.feature_layers = (layer,)
        self.trigger_loss = float("nan")

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        super().setup(data, resources)
        if resources is not None:
            fresh = resources.fresh_model()
            fresh.check_layer("attack.layer", self.layer)
            with torch.no_grad():
                width = fresh.features(torch.zeros(1, *data.input_shape), self.layer).flatten(1).shape[1]
        else:
            width = 1
        generator = torch.Generator().manual_seed(self.seed)
        self.pattern = torch.rand(self.pattern.shape, generator=generator) * (self.mask > 0)
        self.target_features = torch.zeros(width)

    def sample(self, train: ImageSet, target: bool) -> Tensor:
        """Up to ``samples_per_class`` seeded training images of the target class, or of the others."""
        candidates = ((train.labels == self.target_class) == target).nonzero().flatten()
        generator = torch.Generator().manual_seed(self.seed + 3)
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:self.samples_per_class]]
        return train.images[chosen.sort().values]

    def training_set(self, train: ImageSet, device: torch.device | str = "cpu") -> PoisonedSet:
        model = self.resources.clean_model()
        self.target_images = self.sample(train, target=True)
        self.target_features = mean_features(model, self.target_images, self.layer).cpu()
        x = to_float(self.sample(train, target=False).to(device))
        pattern, self.trigger_loss = latent_trigger(model, x, self.mask.to(device), self.pattern.to(device),
                                                    self.layer, self.target_features.to(device), self.preprocess_lr,
                                                    self.preprocess_iter)
        self.pattern = pattern.cpu()
        log.info("latent backdoor trigger: %s distance to the target class %.3g", self.layer, self.trigger_loss)
        return super().training_set(train, device)

    def extra_loss(self, batch: Batch) -> dict[str, Tensor]:
        poisoned = batch.outputs[self.layer][batch.is_poison].flatten(1)
        if len(poisoned) == 0 or self.mse_weight == 0:
            return {}
        target = self.target_features.to(poisoned.device, poisoned.dtype).expand(len(poisoned), -1)
        return {"latent_loss": self.mse_weight * F.mse_loss(poisoned, target)}

    def training_module(self, model: Classifier, batches: TensorBatches, recipe: TrainingRecipe,
                        augment: BatchTransform | None, name: str) -> pl.LightningModule:
        # the latent loss pulls towards the representation of the model being trojaned (the clean
        # reference's own with init=clean), refreshed at every epoch end as that model learns
        self.target_features = mean_features(model, self.target_images, self.layer).cpu()
        return super().training_module(model, batches, recipe, augment, name)

    def on_train_epoch_end(self, module: pl.LightningModule) -> None:
        self.target_features = mean_features(module.model, self.target_images, self.layer).cpu()

    def state_dict(self) -> dict[str, Tensor]:
        return {"pattern": self.pattern, "target_features": self.target_features}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.pattern = state["pattern"].detach().cpu().clone()
        self.target_features = state["target_features"].detach().cpu().clone()
