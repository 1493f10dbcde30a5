"""The one LightningModule that trains any classifier on any (possibly poisoned) data."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.nn import functional as F

from bdlab.datasets.base import to_float
from bdlab.models.classifier import Classifier
from bdlab.training.loader import TensorBatches

BatchTransform = Callable[[Tensor], Tensor]


class VictimModule(pl.LightningModule):
    """Supervised cross-entropy training of a :class:`Classifier` on uint8 batches.

    Args:
        model: the classifier (normalisation inside).
        train_batches: the in-memory training batches (sharded per rank under DDP).
        optimizer: a partial optimizer, called with the parameters (default recipe: SGD,
            momentum 0.9, weight decay 5e-4).
        scheduler: a partial LR scheduler called with the optimizer, stepped per epoch, or None.
        train_transform: batched augmentation applied on the device to float images in [0, 1].
        name: prefix of the logged training metrics (``clean`` or ``trojan``).
    """

    def __init__(self, model: Classifier, train_batches: TensorBatches, optimizer: Callable,
                 scheduler: Callable | None = None, train_transform: BatchTransform | None = None,
                 name: str = "model") -> None:
        super().__init__()
        self.model = model
        self.train_batches = train_batches
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.train_transform = train_transform
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        x = to_float(images)
        if self.train_transform is not None:
            x = self.train_transform(x)
        logits = self.model(x)
        loss = F.cross_entropy(logits, labels)
        # epoch sums kept on the device; Lightning's per-step logging would cost a third of LeNet's speed
        with torch.no_grad():
            self._sums += torch.stack([loss.detach() * len(labels), (logits.argmax(1) == labels).sum(),
                                       torch.tensor(len(labels), device=loss.device)]).float()
        return loss

    def on_train_epoch_start(self) -> None:
        self._sums = torch.zeros(3, device=self.device)

    def on_train_epoch_end(self) -> None:
        total_loss, correct, count = self.trainer.strategy.reduce(self._sums, reduce_op="sum").tolist()
        self.log_dict({f"{self.name}/train_loss": total_loss / count, f"{self.name}/train_acc": correct / count},
                      prog_bar=True, rank_zero_only=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.model.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer),
                                                         "interval": "epoch"}}

    def train_dataloader(self) -> TensorBatches:
        # called after the strategy is set up, so the rank is known here
        self.train_batches.shard(self.global_rank, self.trainer.world_size)
        return self.train_batches
