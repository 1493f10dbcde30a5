"""The metrics of docs/metrics.md, each computed from logits exactly as its definition says.

Rates (ACC, ASR, CAD, ARD, TPR, FPR) are in percent, as the papers' tables print them;
confidences (TMC, CCC) are probabilities in [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy


def percent(flags: Tensor) -> float:
    """Percent of True entries of a bool tensor (NaN for none): every rate metric reduces to this."""
    return 100.0 * flags.double().mean().item() if len(flags) else math.nan


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """ACC: top-1 accuracy in percent."""
    if len(labels) == 0:
        return math.nan
    return 100.0 * multiclass_accuracy(logits, labels, num_classes=logits.shape[1], average="micro").item()


def attack_success_rate(poisoned_logits: Tensor, target_class: int) -> float:
    """ASR: percent of poisoned inputs (built from non-target images) classified as the target."""
    return percent(poisoned_logits.argmax(1) == target_class)


def target_confidence(poisoned_logits: Tensor, target_class: int) -> float:
    """TMC: mean softmax probability of the target over the *successful* poisoned inputs."""
    success = poisoned_logits.argmax(1) == target_class
    if not success.any():
        return math.nan
    return torch.softmax(poisoned_logits[success].double(), 1)[:, target_class].mean().item()


def true_class_confidence(logits: Tensor, labels: Tensor) -> float:
    """CCC: mean softmax probability of the true class over clean inputs."""
    if len(labels) == 0:
        return math.nan
    probabilities = torch.softmax(logits.double(), 1)
    return probabilities.gather(1, labels[:, None]).mean().item()
