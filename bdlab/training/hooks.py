"""How a method changes the default training module without writing its own (docs/extending.md).

Every attack is a :class:`TrainingHooks`; the defaults change nothing, so an attack that only
stamps a poisoned set once trains exactly like a clean model. The victim module calls, per batch:

1. :meth:`TrainingHooks.poison_batch` on the raw float images (per-batch poisoning that sees the
   labels and the poison flags),
2. the dataset's augmentation, then :meth:`TrainingHooks.train_transform` (the ``+`` enhancement),
3. :meth:`TrainingHooks.after_augment` with the module (its model): adversarial examples or generated
   triggers against the current model (adversarial retraining, hardening),
4. one forward pass that also captures :attr:`TrainingHooks.feature_layers`,
5. :meth:`TrainingHooks.classification_loss` (cross-entropy by default) plus :meth:`TrainingHooks.extra_loss`,

then, with :meth:`TrainingHooks.auxiliaries`, one step of each auxiliary's own optimiser
(:class:`~bdlab.training.victim.CoOptimisationModule`), and :meth:`TrainingHooks.on_train_epoch_end`
at the end of every epoch.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bdlab.models.classifier import Classifier


@dataclass
class Batch:
    """One training batch after poisoning and augmentation, with the forward pass's outputs
    (``logits`` and every layer named in ``feature_layers``)."""

    x: Tensor
    labels: Tensor
    is_poison: Tensor
    outputs: dict[str, Tensor]

    def detached(self) -> Batch:
        return Batch(self.x.detach(), self.labels, self.is_poison, {k: v.detach() for k, v in self.outputs.items()})


class Auxiliary(nn.Module):
    """A trainable part beside the classifier (a trigger, a discriminator, a generator) with its own
    optimiser. After every ``every``-th model step it takes ``steps`` steps on :meth:`auxiliary_loss`
    with the batch (outputs detached from the model step); :meth:`project` restores its constraints
    after each."""

    steps: int = 1
    every: int = 1

    @abstractmethod
    def configure_optimizer(self) -> torch.optim.Optimizer:
        """The optimiser of this part's own parameters."""

    @abstractmethod
    def auxiliary_loss(self, model: Classifier, batch: Batch) -> Tensor:
        """The loss this part minimises on the current model (which it must not change)."""

    def project(self) -> None:
        """Put the parameters back inside their feasible set after a step (default: nothing to do)."""


class TrainingHooks:
    """The per-batch, per-epoch and auxiliary hooks of the default training module; see the module
    docstring for the order. Subclasses override what their method changes."""

    #: layers (Classifier.features names) whose activations :meth:`extra_loss` reads from ``batch.outputs``
    feature_layers: tuple[str, ...] = ()

    def poison_batch(self, x: Tensor, labels: Tensor, is_poison: Tensor) -> tuple[Tensor, Tensor]:
        """Per-batch poisoning of float images in ``[0, 1]``: returns the images and labels to train on."""
        return x, labels

    def train_transform(self, x: Tensor) -> Tensor:
        """A batched transform applied to every training image after the dataset's augmentation."""
        return x

    def after_augment(self, module: pl.LightningModule, x: Tensor, labels: Tensor,
                      is_poison: Tensor) -> tuple[Tensor, Tensor]:
        """Change the augmented batch with the current model (``module.model``; ``module`` also gives the
        schedule: ``global_step``, ``train_batches``): returns the images and labels the model steps on."""
        return x, labels

    def classification_loss(self, logits: Tensor, labels: Tensor, is_poison: Tensor) -> Tensor:
        """The model step's classification loss on the batch's logits (default: the mean cross-entropy)."""
        return F.cross_entropy(logits, labels)

    def extra_loss(self, batch: Batch) -> dict[str, Tensor]:
        """Named loss terms added to the cross-entropy of the model step (logged per epoch)."""
        return {}

    def auxiliaries(self) -> list[Auxiliary]:
        """Trainable parts with their own optimisers, stepped after each model step."""
        return []

    def on_train_epoch_end(self, module: pl.LightningModule) -> None:
        """Work at the end of every training epoch (the module gives the model and the trainer)."""
