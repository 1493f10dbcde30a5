"""Fine-pruning (Liu, Dolan-Gavitt & Garg, RAID 2018): prune the channels clean inputs leave dormant, then fine-tune."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits, ImageSet
from bdlab.defenses.model_sanitisation.base import ModelSanitization, fine_tune
from bdlab.errors import ConfigError, check_at_least, check_range
from bdlab.evaluate import evaluate, predict
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices
from bdlab.training.augment import TrainAugment


def last_convolution(model: Classifier) -> str:
    """The name of the backbone's last ``nn.Conv2d`` (Liu et al. prune the last convolutional layer)."""
    names = [name for name, module in model.net.named_modules() if isinstance(module, nn.Conv2d)]
    if not names:
        raise ConfigError("defense.layer", "the model has no convolution to prune; name a layer")
    return names[-1]


def channel_activity(model: Classifier, images: Tensor, layer: str) -> Tensor:
    """``(C,)`` mean activation of each output channel of ``layer`` over uint8 ``images``."""
    return predict(model, images, layers=layer).transpose(0, 1).flatten(1).mean(1)


def channel_mask(conv: nn.Conv2d, pruned: Tensor) -> dict[str, Tensor]:
    """Masks that zero the weights and bias of the ``pruned`` output channels of ``conv``."""
    keep = torch.ones(conv.out_channels, device=conv.weight.device)
    keep[pruned] = 0
    masks = {"weight": keep.view(-1, *([1] * (conv.weight.dim() - 1))).expand_as(conv.weight).clone()}
    if conv.bias is not None:
        masks["bias"] = keep.clone()
    return masks


class FinePruning(ModelSanitization):
    """Fine-pruning (Liu et al., "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
    Networks", RAID 2018, §4; TrojanZoo's "Fp", Table 21: prune ratio 0.95).

    1. Pruning (§4.1): the output channels of ``layer`` (default: the last convolution) are ranked by
       their mean activation on the held-out clean images, least active first, and pruned one by one
       (weight and bias zeroed through ``torch.nn.utils.prune`` masks) while the held-out accuracy
       stays within ``max_acc_drop`` points of the unpruned model's (Liu et al. stop at 4 points) and
       at most ``max_prune_ratio`` percent of the channels are pruned (TrojanZoo's 95).
    2. Fine-tuning (§4.2): the pruned model is trained on the held-out split for ``epochs`` at ``lr``
       with the run's recipe, its pruning masks in place, so pruned channels stay pruned.

    Reports ``defense/pruned_share`` (% of the layer's channels), ``defense/pruned_channels`` and
    ``defense/acc_pruned`` (held-out accuracy after pruning, before fine-tuning), besides the
    sanitisation protocol's ACC, ASR, ARD, CAD and ART.

    Args:
        layer: the convolution to prune (null: the last one).
        max_acc_drop: held-out accuracy loss allowed by pruning, in points, in (0, 100) (default 4).
        max_prune_ratio: most channels pruned, in percent, in (0, 100) (default 95).
        epochs: fine-tuning epochs (default 10).
        lr: fine-tuning learning rate (default 0.005, as unlearning).
        seed: the fine-tuning's batch order.
    """

    name = "fine_pruning"

    def __init__(self, layer: str | None = None, max_acc_drop: float = 4.0, max_prune_ratio: float = 95.0,
                 epochs: int = 10, lr: float = 0.005, seed: int = 0) -> None:
        check_range("defense.max_acc_drop", max_acc_drop, 0.0, 100.0, low_open=True, high_open=True)
        check_range("defense.max_prune_ratio", max_prune_ratio, 0.0, 100.0, low_open=True, high_open=True)
        check_at_least("defense.epochs", epochs, 0)
        if not lr > 0:
            raise ConfigError("defense.lr", f"got {lr}, must be > 0")
        self.layer, self.max_acc_drop, self.max_prune_ratio = layer, float(max_acc_drop), float(max_prune_ratio)
        self.epochs, self.lr, self.seed = int(epochs), float(lr), seed

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        if len(data.defense) == 0:
            raise ConfigError("dataset.defense_fraction", "fine-pruning needs held-out clean images; raise it above 0")

    def check_model(self, model: Classifier) -> None:
        if self.layer is None:
            last_convolution(model)
            return
        model.check_layer("defense.layer", self.layer)
        if not isinstance(dict(model.net.named_modules())[self.layer], nn.Conv2d):
            raise ConfigError("defense.layer", f"{self.layer!r} is not a convolution; name an nn.Conv2d layer "
                              f"(the last one is {last_convolution(model)!r})")

    def settings(self) -> dict[str, Any]:
        return {"layer": self.layer, "max_acc_drop": self.max_acc_drop, "max_prune_ratio": self.max_prune_ratio,
                "epochs": self.epochs, "lr": self.lr, "seed": self.seed}

    def prune(self, model: Classifier, held_out: ImageSet) -> tuple[nn.Conv2d, int, float]:
        """Step 1 on ``model`` in place; returns the layer, the pruned channel count and the held-out ACC."""
        layer = self.layer or last_convolution(model)
        conv = dict(model.net.named_modules())[layer]
        model.eval()
        order = channel_activity(model, held_out.images, layer).argsort()
        pruned, accuracy = 0, evaluate(model, held_out, None, 0).acc  # the held-out ACC (no poisoned set, no target)
        floor = accuracy - self.max_acc_drop
        limit = int(self.max_prune_ratio / 100 * conv.out_channels)
        original = {name: getattr(conv, name).detach().clone() for name in ("weight", "bias")
                    if getattr(conv, name) is not None}
        # one channel more at a time on a scratch copy of the weights; Liu et al.'s sequential search
        for count in range(1, limit + 1):
            masks = channel_mask(conv, order[:count])
            with torch.no_grad():
                for name, value in original.items():
                    getattr(conv, name).copy_(value * masks[name])
            trial = evaluate(model, held_out, None, 0).acc
            if trial < floor:
                break
            pruned, accuracy = count, trial
        with torch.no_grad():
            for name, value in original.items():
                getattr(conv, name).copy_(value)
        for name, mask in channel_mask(conv, order[:pruned]).items():
            prune.custom_from_mask(conv, name, mask)
        return conv, pruned, accuracy

    def sanitize(self, model: Classifier, context: RunServices) -> dict[str, Any]:
        held_out = context.data.defense
        conv, pruned, accuracy = self.prune(model.to(context.device), held_out)
        if self.epochs > 0:
            augment = TrainAugment(context.data.crop_padding, context.data.hflip)
            fine_tune(model, held_out, context.recipe, self.epochs, self.lr, augment, self.seed, "fine_pruning")
        for name in [n for n in ("weight", "bias") if prune.is_pruned(conv) and hasattr(conv, f"{n}_mask")]:
            prune.remove(conv, name)  # the masks become zeros in the plain weights: the state dict keeps its keys
        return {"pruned_channels": pruned, "pruned_share": 100.0 * pruned / conv.out_channels, "acc_pruned": accuracy}
