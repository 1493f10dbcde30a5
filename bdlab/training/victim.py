"""The LightningModules of supervised training: victim training and trigger co-optimisation."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bdlab.datasets.base import to_float
from bdlab.models.classifier import LOGITS, Classifier
from bdlab.training.hooks import Batch, TrainingHooks
from bdlab.training.loader import BatchedModule, TensorBatches
from bdlab.training.recipe import TrainingRecipe

BatchTransform = Callable[[Tensor], Tensor]


def split_cross_entropy(logits: Tensor, labels: Tensor, is_poison: Tensor) -> tuple[Tensor, Tensor]:
    """The mean cross-entropies of the clean and of the flagged (poisoned) samples of a batch; a part
    with no sample contributes 0 (TrojanZoo §6.2 RQ6's L_clean and L_poison)."""
    losses = F.cross_entropy(logits, labels, reduction="none")
    flags = is_poison.to(losses.device)

    def mean(part: Tensor) -> Tensor:
        return losses[part].sum() / part.sum().clamp(min=1)
    return mean(~flags), mean(flags)


class VictimModule(BatchedModule):
    """Supervised cross-entropy training of a :class:`Classifier` on uint8 batches, changed by ``hooks``
    (:mod:`bdlab.training.hooks`: per-batch poisoning, the ``+`` enhancement, work on the augmented
    batch with the model (adversarial examples, generated triggers), extra loss terms, epoch-end work).

    Args:
        model: the classifier (normalisation inside).
        train_batches: the in-memory training batches with their poison flags (sharded per rank under DDP).
        recipe: the run's optimizer and scheduler (stepped per epoch); default recipe SGD, momentum
            0.9, weight decay 5e-4, cosine schedule.
        augment: the dataset's batched augmentation, applied on the device to float images in [0, 1].
        hooks: the method's hooks (an attack); None trains a plain classifier.
        name: prefix of the logged training metrics (``clean`` or ``trojan``).
    """

    def __init__(self, model: Classifier, train_batches: TensorBatches, recipe: TrainingRecipe,
                 augment: BatchTransform | None = None, hooks: TrainingHooks | None = None,
                 name: str = "model") -> None:
        super().__init__(train_batches)
        self.model = model
        self.recipe = recipe
        self.augment = augment
        self.hooks = hooks if hooks is not None else TrainingHooks()
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_batch(self, batch: tuple[Tensor, Tensor, Tensor]) -> Batch:
        """Poison, augment, transform and forward one batch; the outputs hold the logits and the hooks' layers."""
        images, labels, is_poison = batch
        x, labels = self.hooks.poison_batch(to_float(images), labels, is_poison)
        if self.augment is not None:
            x = self.augment(x)
        x, labels = self.hooks.after_augment(self, self.hooks.train_transform(x), labels, is_poison)
        layers = self.hooks.feature_layers
        outputs = self.model.features(x, [*layers, LOGITS]) if layers else {LOGITS: self.model(x)}
        return Batch(x, labels, is_poison, outputs)

    def model_loss(self, batch: Batch) -> Tensor:
        """The hooks' classification loss (cross-entropy by default) plus their extra terms; keeps the
        epoch sums that are logged."""
        logits = batch.outputs[LOGITS]
        loss = self.hooks.classification_loss(logits, batch.labels, batch.is_poison)
        extra = self.hooks.extra_loss(batch)
        # epoch sums kept on the device; Lightning's per-step logging would cost a third of LeNet's speed
        with torch.no_grad():
            count = len(batch.labels)
            self._sums += torch.stack([loss.detach() * count, (logits.argmax(1) == batch.labels).sum(),
                                       torch.tensor(count, device=loss.device)]).float()
            for term, value in extra.items():
                self._extra[term] = self._extra.get(term, 0.0) + value.detach() * count
        return loss + sum(extra.values()) if extra else loss

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.model_loss(self.training_batch(batch))

    def on_train_epoch_start(self) -> None:
        self._sums = torch.zeros(3, device=self.device)
        self._extra: dict[str, Tensor] = {}

    def on_train_epoch_end(self) -> None:
        reduce = self.trainer.strategy.reduce
        total_loss, correct, count = reduce(self._sums, reduce_op="sum").tolist()
        logged = {f"{self.name}/train_loss": total_loss / count, f"{self.name}/train_acc": correct / count}
        for term, value in self._extra.items():
            logged[f"{self.name}/{term}"] = reduce(value, reduce_op="sum").item() / count
        self.log_dict(logged, prog_bar=True, rank_zero_only=True)
        self.hooks.on_train_epoch_end(self)

    def configure_optimizers(self):
        return self.recipe.configure_optimizers(self.model.parameters())


class CoOptimisationModule(VictimModule):
    """Victim training alternating with the steps of trainable parts beside the model (TrojanZoo's
    input-model co-optimisation, Pang et al. 2020): after every ``every``-th model step on the
    (poisoned, augmented) batch, each auxiliary of ``hooks`` (a trigger, a discriminator, a
    generator) takes ``steps`` steps of its own optimiser on its own loss, with the model in eval
    mode and its parameters untouched, projecting back onto its constraints after each.

    Lightning's manual optimisation: the model's optimizer and scheduler come from the recipe
    (the scheduler stepped once per epoch, as in :class:`VictimModule`), each auxiliary brings
    its own optimizer. Args as :class:`VictimModule`; ``hooks.auxiliaries()`` must not be empty.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        parts = self.hooks.auxiliaries()
        if not parts:
            raise ValueError("co-optimisation needs at least one auxiliary (hooks.auxiliaries() is empty)")
        self.auxiliaries = nn.ModuleList(parts)
        self.automatic_optimization = False
        self._model_steps = 0

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        model_optimizer, *auxiliary_optimizers = self.optimizers()
        step = self.training_batch(batch)
        loss = self.model_loss(step)
        model_optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        model_optimizer.step()
        self._model_steps += 1
        detached = step.detached()
        training = self.model.training
        self.model.eval()  # the auxiliaries see the model as it predicts (batch-norm statistics frozen)
        for part, optimizer in zip(self.auxiliaries, auxiliary_optimizers):
            if self._model_steps % part.every:
                continue
            for _ in range(part.steps):
                optimizer.zero_grad(set_to_none=True)
                self.manual_backward(part.auxiliary_loss(self.model, detached))
                optimizer.step()
                part.project()
        self.model.zero_grad(set_to_none=True)
        self.model.train(training)
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        super().on_train_epoch_end()

    def configure_optimizers(self):
        model = self.recipe.configure_optimizers(self.model.parameters())
        optimizers = [model] if isinstance(model, torch.optim.Optimizer) else [model["optimizer"]]
        optimizers += [part.configure_optimizer() for part in self.auxiliaries]
        if isinstance(model, torch.optim.Optimizer):
            return optimizers
        return optimizers, [model["lr_scheduler"]]
