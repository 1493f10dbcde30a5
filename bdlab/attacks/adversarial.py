"""Adversarial-example tools the label-consistent attack builds on: L-infinity PGD (Madry et al.,
ICLR 2018), an object mask to confine it, a logit ensemble of surrogates, and fast FGSM
adversarial training of a robust surrogate (Wong, Rice and Kolter, ICLR 2020)."""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bdlab.datasets.base import to_float
from bdlab.models.classifier import Classifier

log = logging.getLogger(__name__)


class LogitEnsemble(nn.Module):
    """The mean logits of several classifiers (Dong et al., "Boosting Adversarial Attacks with
    Momentum", CVPR 2018, section 3.2: ensemble in logits, equal weights).

    PGD on the ensemble must fool every member at once, so its perturbations transfer better
    to a model none of them is (their Table 3; Liu et al., ICLR 2017, make the same point)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)


def pgd_untargeted(model: nn.Module, x: Tensor, labels: Tensor, epsilon: float, step: float,
                   iterations: int, region: Tensor | None = None) -> Tensor:
    """L-infinity PGD (Madry et al.) that maximises the cross-entropy of the true label; no random start.

    ``region`` (0/1, broadcastable to ``x``) confines the perturbation to its pixels."""
    model.eval()
    adversarial = x.clone()
    for _ in range(iterations):
        adversarial.requires_grad_(True)
        loss = F.cross_entropy(model(adversarial), labels)
        (grad,) = torch.autograd.grad(loss, adversarial)
        with torch.no_grad():
            adversarial = adversarial + step * grad.sign()
            adversarial = torch.min(torch.max(adversarial, x - epsilon), x + epsilon).clamp_(0.0, 1.0)
            if region is not None:
                adversarial = x + region * (adversarial - x)
    return adversarial.detach()


def foreground(x: Tensor, dilation: int) -> Tensor:
    """``(N, 1, H, W)`` 0/1 mask of the pixels within ``dilation`` pixels (Chebyshev distance) of a
    non-zero pixel of any channel of ``x``."""
    occupied = (x.amax(1, keepdim=True) > 0).float()
    return F.max_pool2d(occupied, 2 * dilation + 1, stride=1, padding=dilation) if dilation else occupied


def fast_adversarial_training(model: Classifier, images: Tensor, labels: Tensor, epsilon: float, step: float,
                              epochs: int, lr: float, batch_size: int, seed: int) -> Classifier:
    """Train ``model`` in place with FGSM adversarial training from a uniform random start
    ("Fast is better than free", Wong, Rice and Kolter, ICLR 2020, Algorithm 3).

    Each batch is perturbed by ``delta ~ U(-epsilon, epsilon)`` followed by one signed-gradient
    step of size ``step`` (they use 1.25 epsilon), projected back onto the L-infinity ball and
    the valid pixel range, and the model takes an SGD step (momentum 0.9, weight decay 5e-4) on
    the perturbed batch. The learning rate follows their cyclic schedule: linear from 0 to
    ``lr`` over the first half of training and back to 0. ``images`` are uint8 on the CPU;
    batches move to the model's device one at a time. Seeded by ``seed`` (order and starts).
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    batches = math.ceil(len(images) / batch_size)
    total = max(epochs * batches, 1)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        correct = seen = 0
        for batch in range(batches):
            index = order[batch * batch_size:(batch + 1) * batch_size]
            x = to_float(images[index].to(device))
            y = labels[index].to(device)
            progress = (epoch * batches + batch) / total
            for group in optimizer.param_groups:
                group["lr"] = lr * (1.0 - abs(2.0 * progress - 1.0))
            delta = (torch.rand(x.shape, generator=generator) * 2 - 1).to(device) * epsilon
            delta = ((x + delta).clamp(0.0, 1.0) - x).requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x + delta), y), delta)
            with torch.no_grad():
                delta = (delta + step * grad.sign()).clamp(-epsilon, epsilon)
                adversarial = (x + delta).clamp(0.0, 1.0)
            logits = model(adversarial)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        log.info("robust surrogate: epoch %d/%d, FGSM training accuracy %.2f%%", epoch + 1, epochs,
                 100.0 * correct / max(seen, 1))
    return model.eval()


def reset_parameters(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every layer of ``model`` that can (fresh weights, seeded; buffers kept)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if module is not model and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model
