"""The hardening LightningModule: training on inputs stamped with universal triggers generated on the fly."""

from __future__ import annotations

import torch
from torch import Tensor

from bdlab.datasets.base import to_float
from bdlab.inversion.engine import InversionMethod, Schedule
from bdlab.models.classifier import LOGITS, Classifier
from bdlab.training.hooks import Batch
from bdlab.training.loader import TensorBatches
from bdlab.training.recipe import TrainingRecipe
from bdlab.training.victim import BatchTransform, VictimModule

SCHEDULE = Schedule()
# a generated trigger is stamped once it sends this share of the batch's images to its class
SUCCESS = 0.9


class HardeningModule(VictimModule):
    """Model hardening (the Pixel paper, Tao et al. CVPR 2022, §5.4 and App. L.1): like adversarial
    training, every batch carries triggers generated against the current model, with their true labels.

    The generator (an inversion method: Neural Cleanse's mask and pattern, which makes this the
    paper's "iterative NC", Pixel's perturbation, or a UAP) keeps one universal trigger per class.
    At each step a target class is drawn; its trigger takes ``inner_steps`` Adam steps (learning
    rate the generator's) on ``attack loss + lambda x regulariser`` over a ``share`` of the batch's
    images of the other classes, with the model in eval mode and untouched. lambda follows Neural
    Cleanse's schedule per update (x1.5 when the trigger sends 90% of them to its class, /1.5^1.5
    when not), so the triggers stay near the smallest that work; a trigger that works is stamped on
    those images, which keep their true labels, and the model takes its step on the whole batch (a
    trigger that does not work yet is not trained against: it would be noise with a label). The
    triggers carry over from batch to batch (warm starts: a universal trigger, unlike a PGD
    perturbation, is worth keeping).

    Args:
        model, train_batches, recipe, augment, name: as :class:`~bdlab.training.victim.VictimModule`.
        generator: the inversion method that generates the triggers.
        num_classes: the model's classes.
        share: share of the other-class images of a batch that carry the trigger.
        inner_steps: generator steps per training step.
        weight: the generator's initial regulariser weight (lambda).
        seed: the initial triggers.
    """

    def __init__(self, model: Classifier, train_batches: TensorBatches, recipe: TrainingRecipe,
                 augment: BatchTransform | None, generator: InversionMethod, num_classes: int, share: float,
                 inner_steps: int, weight: float, seed: int, name: str = "hardened") -> None:
        super().__init__(model, train_batches, recipe, augment, None, name)
        self.generator, self.num_classes, self.share = generator, num_classes, share
        self.inner_steps = inner_steps
        self.weights = [weight] * num_classes
        shape = tuple(train_batches.images.shape[1:])
        self.triggers = generator.variables(list(range(num_classes)), shape, seed)
        self.trigger_optimizers: list[torch.optim.Optimizer] = []

    def on_fit_start(self) -> None:
        self.triggers = {name: [value.to(self.device).requires_grad_(True) for value in values]
                         for name, values in self.triggers.items()}
        self.trigger_optimizers = [torch.optim.Adam([values[k] for values in self.triggers.values()],
                                                    lr=self.generator.lr, betas=(0.5, 0.9))
                                   for k in range(self.num_classes)]

    def harden(self, x: Tensor, labels: Tensor) -> Tensor:
        """A ``share`` of the batch's other-class images stamped with the drawn class's refreshed trigger."""
        target = int(torch.randint(self.num_classes, (1,)))
        pool = (labels != target).nonzero().flatten()
        chosen = pool[torch.randperm(len(pool), device=pool.device)[:round(self.share * len(pool))]]
        if len(chosen) == 0:
            return x
        images = x[chosen].detach()[None]
        goal = torch.tensor([target], device=x.device)
        parameters = [values[target] for values in self.triggers.values()]
        training = self.model.training
        self.model.eval()
        for _ in range(self.inner_steps):
            stamped = self.generator.stamp(self.triggers, [target], images)
            logits = self.model(stamped[0])
            loss = self.generator.attack_loss(logits[None], goal).mean() + \
                self.weights[target] * self.generator.regulariser(self.triggers, [target], images).sum()
            gradients = torch.autograd.grad(loss, parameters)  # the trigger's alone: the model is not stepped here
            for parameter, gradient in zip(parameters, gradients):
                parameter.grad = gradient
            self.trigger_optimizers[target].step()
            with torch.no_grad():
                self.generator.project(self.triggers, [target])
        self.model.train(training)
        success = float((logits.argmax(1) == target).float().mean())
        # Neural Cleanse's schedule, per update: a trigger that works is pushed to shrink, one that does not to grow
        self.weights[target] *= SCHEDULE.up if success >= SUCCESS else 1 / SCHEDULE.down
        if success < SUCCESS:
            return x  # only a trigger that works on the current model is trained against
        with torch.no_grad():
            x = x.clone()
            x[chosen] = self.generator.stamp(self.triggers, [target], images)[0]
        return x

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels, is_poison = batch
        x = to_float(images)
        if self.augment is not None:
            x = self.augment(x)
        x = self.harden(x, labels)
        return self.model_loss(Batch(x, labels, is_poison, {LOGITS: self.model(x)}))
