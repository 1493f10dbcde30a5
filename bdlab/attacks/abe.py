"""ABE, adversarial backdoor embedding (Tan and Shokri, EuroS&P 2020; TrojanZoo's "Abe"): a
discriminator learns to tell poisoned from clean inputs by their latent representation, and the
trojaned model learns to fool it."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bdlab.attacks.badnets import BadNets
from bdlab.errors import ConfigError, check_at_least
from bdlab.models.classifier import PENULTIMATE, Classifier
from bdlab.training.hooks import Auxiliary, Batch
from bdlab.training.loader import TensorBatches
from bdlab.training.recipe import TrainingRecipe
from bdlab.training.victim import BatchTransform


def balanced_bce(logits: Tensor, is_poison: Tensor) -> Tensor:
    """Binary cross-entropy of telling poisoned (1) from clean (0), the two groups weighted equally
    (a batch holds about ``poison_rate`` poisoned samples)."""
    target = is_poison.to(logits.dtype)
    losses = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    groups = [losses[is_poison], losses[~is_poison]]
    return torch.stack([group.mean() for group in groups if len(group)]).mean()


class Discriminator(Auxiliary):
    """An MLP on latent representations (``hidden`` units per layer, ReLU) that predicts whether an
    input is poisoned; trained on the detached representations with its own Adam optimiser."""

    def __init__(self, width: int, hidden: list[int], lr: float) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))
        self.lr = lr

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features).squeeze(1)

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def auxiliary_loss(self, model: Classifier, batch: Batch) -> Tensor:
        return balanced_bce(self(batch.outputs[PENULTIMATE]), batch.is_poison)


class ABE(BadNets):
    """Adversarial backdoor embedding (Tan and Shokri, "Bypassing Backdoor Detection Algorithms in Deep
    Learning", EuroS&P 2020, Algorithm 1; TrojanZoo §4.1 "Abe": the loss ``Delta(d(g(x)), b(x))``).

    BadNets' poisoned set, trained in the co-optimisation module with a discriminator ``d`` on the
    model's penultimate representation ``g(x)``:

    - model step: cross-entropy minus ``disc_weight`` (lambda) times the discriminator's loss,
      so the model learns representations in which poisoned and clean inputs look alike (what
      latent-space defenses such as activation clustering and spectral signatures rely on);
    - discriminator step: ``disc_steps`` Adam steps (learning rate ``disc_lr``) on its loss of
      telling poisoned from clean samples of the batch (:func:`balanced_bce`).

    Defaults from TrojanZoo Table 20: lambda 0.1, discriminator learning rate 1e-3; the
    discriminator is an MLP with ``disc_hidden`` (256, 128) hidden units.

    Args:
        disc_weight: lambda, weight of the discriminator's loss in the model's (default 0.1); >= 0.
        disc_lr: Adam learning rate of the discriminator (default 1e-3).
        disc_hidden: hidden layer widths of the discriminator (default [256, 128]).
        disc_steps: discriminator steps per model step (default 1).
        patch_size, position, margin, color, pattern_file, alpha, poison_rate, target_class, seed,
            enhance, enhance_max_shrink: see :class:`~bdlab.attacks.badnets.BadNets`.
    """

    name = "abe"
    feature_layers = (PENULTIMATE,)

    def __init__(self, disc_weight: float = 0.1, disc_lr: float = 1e-3, disc_hidden: list[int] = (256, 128),
                 disc_steps: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not disc_weight >= 0:
            raise ConfigError("attack.disc_weight", f"got {disc_weight}, lambda must be >= 0")
        if not disc_lr > 0:
            raise ConfigError("attack.disc_lr", f"got {disc_lr}, must be > 0")
        if any(size < 1 for size in disc_hidden):
            raise ConfigError("attack.disc_hidden", f"got {list(disc_hidden)}, widths must be >= 1")
        check_at_least("attack.disc_steps", disc_steps, 1)
        self.disc_weight, self.disc_lr = float(disc_weight), float(disc_lr)
        self.disc_hidden, self.disc_steps = [int(size) for size in disc_hidden], int(disc_steps)
        self.discriminator: Discriminator | None = None

    def training_module(self, model: Classifier, batches: TensorBatches, recipe: TrainingRecipe,
                        augment: BatchTransform | None, name: str) -> pl.LightningModule:
        # seeded apart from the model's initialisation, so the discriminator does not shift it
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + 4)
            self.discriminator = Discriminator(model.last_linear().in_features, self.disc_hidden, self.disc_lr)
        self.discriminator.steps = self.disc_steps
        return super().training_module(model, batches, recipe, augment, name)

    def auxiliaries(self) -> list[Auxiliary]:
        return [] if self.discriminator is None else [self.discriminator]

    def extra_loss(self, batch: Batch) -> dict[str, Tensor]:
        if self.discriminator is None or not bool(batch.is_poison.any()) or bool(batch.is_poison.all()):
            return {}
        return {"disc_term": -self.disc_weight * balanced_bce(self.discriminator(batch.outputs[PENULTIMATE]),
                                                               batch.is_poison)}
