"""IMC, input-model co-optimisation (Pang et al., CCS 2020; TrojanZoo's "Imc"): the trigger and the
trojaned model are optimised together, each step of one making the other more effective."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bdlab.attacks.base import PoisonedSet, blend
from bdlab.attacks.trojannn import TrojanNN
from bdlab.datasets.base import DatasetSplits, ImageSet
from bdlab.errors import check_at_least, check_range
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices
from bdlab.training.hooks import Auxiliary, Batch


class TriggerDescent(torch.optim.Optimizer):
    """Steps of at most ``lr`` per pixel (torch ships no such optimizer): PGD's signed step
    ``p <- p - lr * sign(grad)`` for a pattern (``normalise: sign``), or the gradient scaled so its
    largest entry is ``lr`` (``normalise: max``) for a mask, which then moves most where the loss is
    most sensitive instead of spreading evenly over the image."""

    def __init__(self, params: Any, lr: float, normalise: str = "sign") -> None:
        super().__init__(params, {"lr": lr, "normalise": normalise})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                grad = parameter.grad
                if group["normalise"] == "sign":
                    direction = grad.sign()
                else:
                    direction = grad / grad.abs().max().clamp_min(1e-12)
                parameter.add_(direction, alpha=-group["lr"])


def project_mask(mask: Tensor, cap: float, budget: float) -> Tensor:
    """The Euclidean projection of ``mask`` onto ``{m : 0 <= m <= cap, sum(m) <= budget}``: clip, and
    when the clipped mask is over budget, clip ``mask - tau`` with ``tau`` found by bisection."""
    clipped = mask.clamp(0.0, cap)
    if clipped.sum() <= budget:
        return clipped
    low, high = 0.0, float(mask.max())
    for _ in range(50):
        tau = (low + high) / 2
        if (mask - tau).clamp(0.0, cap).sum() > budget:
            low = tau
        else:
            high = tau
    return (mask - high).clamp(0.0, cap)


class TriggerParameters(Auxiliary):
    """A mask-and-pattern trigger as trainable tensors with its own optimiser (IMC's trigger step).

    Its loss is the cross-entropy of the target class on the batch's clean non-target images
    stamped with the trigger, so each step makes the trigger work better on the current model.
    Each step (:class:`TriggerDescent`, at most ``lr`` per pixel) moves the pattern by PGD's signed
    step and the mask by its max-normalised gradient; then the pattern is clipped to ``[0, 1]`` and
    the mask projected onto ``[0, cap]`` per pixel with at most ``budget`` in total
    (:func:`project_mask`).
    """

    def __init__(self, mask: Tensor, pattern: Tensor, target_class: int, cap: float, budget: float, lr: float,
                 steps: int, every: int, learn_mask: bool) -> None:
        super().__init__()
        self.mask = nn.Parameter(mask.clone(), requires_grad=learn_mask)
        self.pattern = nn.Parameter(pattern.clone())
        self.target_class, self.cap, self.budget, self.lr = target_class, cap, budget, lr
        self.steps, self.every = steps, every

    def stamp(self, x: Tensor) -> Tensor:
        return blend(x, self.mask, self.pattern)

    def configure_optimizer(self) -> torch.optim.Optimizer:
        groups = [{"params": [self.pattern], "normalise": "sign"}]
        if self.mask.requires_grad:
            groups.append({"params": [self.mask], "normalise": "max"})
        return TriggerDescent(groups, self.lr)

    def auxiliary_loss(self, model: Classifier, batch: Batch) -> Tensor:
        keep = ~batch.is_poison & (batch.labels != self.target_class)
        if not bool(keep.any()):
            return self.pattern.sum() * 0.0
        logits = model(self.stamp(batch.x[keep]))
        return F.cross_entropy(logits, torch.full_like(batch.labels[keep], self.target_class))

    @torch.no_grad()
    def project(self) -> None:
        self.pattern.clamp_(0.0, 1.0)
        if self.mask.requires_grad:
            self.mask.copy_(project_mask(self.mask, self.cap, self.budget))


class IMC(TrojanNN):
    """Input-model co-optimisation (Pang, Shen, Zhang et al., "A Tale of Evil Twins: Adversarial Inputs
    versus Poisoned Models", CCS 2020; TrojanZoo §4.1 "Imc", Eq. 2 optimised over both the trigger and
    the model).

    The trigger starts as TrojanNN's neuron-targeted pattern inside BadNets' patch
    (:class:`~bdlab.attacks.trojannn.TrojanNN`, on the clean reference model), then trains with the
    model in the co-optimisation module (:class:`~bdlab.training.victim.CoOptimisationModule`):

    - model steps: the flagged ``poison_rate`` share of every batch is stamped with the *current*
      trigger and labelled with the target (per-batch poisoning), mixed with the clean samples;
    - trigger steps, after every ``trigger_every`` model steps: ``trigger_steps`` PGD steps of size
      ``trigger_lr`` on the pattern (and the mask, with ``learn_mask``) that lower the target-class
      cross-entropy of the batch's clean non-target images stamped with the trigger, on the
      current model (TrojanZoo's trigger optimiser: PGD, step 20/255, 20 iterations).

    The mask is BadNets' patch at opacity ``alpha`` (TrojanZoo's IMC optimises the mark's pattern
    at a fixed place and transparency). With ``learn_mask`` it is a trainable tensor too, under a
    size budget: each pixel's opacity stays in ``[0, alpha]`` and their sum at most ``alpha`` times
    the patch's area (a 3x3 patch at opacity 1 may spread its 9 units of opacity anywhere, never
    grow). On MNIST / LeNet both reach 100% with an opaque trigger, but at opacity 0.2 the moving
    mask gives 21% against 99.9% for the fixed one (docs/attacks.md), hence the default. The
    trigger is stored with the trojaned model, and the poisoned sets are stamped with it after
    training.

    Args:
        learn_mask: optimise the mask too under the budget (default false: BadNets' patch).
        trigger_lr: PGD step in pixel units (default 20/255, TrojanZoo).
        trigger_steps: PGD steps per trigger update (default 20, TrojanZoo).
        trigger_every: model steps between trigger updates (default 50).
        layer, neuron_count, target_value, preprocess_lr, preprocess_iter, threshold,
            preprocess_images, init: the initial trigger, see :class:`~bdlab.attacks.trojannn.TrojanNN`.
        patch_size, position, margin, alpha, poison_rate, target_class, seed, enhance,
            enhance_max_shrink: see :class:`~bdlab.attacks.badnets.BadNets`.
    """

    name = "imc"
    stamps_per_batch = True

    def __init__(self, learn_mask: bool = False, trigger_lr: float = 20 / 255, trigger_steps: int = 20,
                 trigger_every: int = 50, **kwargs: Any) -> None:
        self.trigger: TriggerParameters | None = None  # the trainable trigger, from setup on
        super().__init__(**kwargs)
        check_range("attack.trigger_lr", trigger_lr, 0.0, 1.0, low_open=True)
        check_at_least("attack.trigger_steps", trigger_steps, 1)
        check_at_least("attack.trigger_every", trigger_every, 1)
        self.learn_mask, self.trigger_lr = bool(learn_mask), float(trigger_lr)
        self.trigger_steps, self.trigger_every = int(trigger_steps), int(trigger_every)

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        self.trigger = None
        super().setup(data, resources)
        box = self.mask
        self.trigger = TriggerParameters(box, self.pattern, self.target_class, cap=self.alpha,
                                         budget=float(box.sum()), lr=self.trigger_lr, steps=self.trigger_steps,
                                         every=self.trigger_every, learn_mask=self.learn_mask)

    # mask and pattern read the trainable trigger once it exists; before that (BadNets' and TrojanNN's
    # setup) they hold the patch's box and the initial pattern
    @property
    def mask(self) -> Tensor:  # type: ignore[override]
        return self._box if self.trigger is None else self.trigger.mask.detach()

    @mask.setter
    def mask(self, value: Tensor) -> None:
        self._box = value

    @property
    def pattern(self) -> Tensor:  # type: ignore[override]
        return self._pattern if self.trigger is None else self.trigger.pattern.detach()

    @pattern.setter
    def pattern(self, value: Tensor) -> None:
        if self.trigger is None:
            self._pattern = value
        else:
            with torch.no_grad():
                self.trigger.pattern.copy_(value)

    def training_set(self, train: ImageSet, device: torch.device | str = "cpu") -> PoisonedSet:
        self.learn_trigger(train, device)  # the neuron-targeted start, written into the trainable pattern
        return self.relabelled(train, train.images)

    def auxiliaries(self) -> list[Auxiliary]:
        return [self.trigger]

    def state_dict(self) -> dict[str, Tensor]:
        return {"mask": self.trigger.mask.detach(), "pattern": self.trigger.pattern.detach()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.trigger.mask.copy_(state["mask"])
            self.trigger.pattern.copy_(state["pattern"])
