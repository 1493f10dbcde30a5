"""IMC, input-model co-optimisation (Pang et al., CCS 2020; TrojanZoo's "Imc"): the trigger and the
trojaned model are optimised together, each step of one making the other more effective."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bdlab.attacks.adaptive import Adaptation, adaptation, opacity_stamp
from bdlab.attacks.base import PoisonedSet, blend
from bdlab.attacks.skip_gradient import SkipGradientScale, check_skip_gamma
from bdlab.attacks.trojannn import TrojanNN
from bdlab.datasets.base import DatasetSplits, ImageSet
from bdlab.errors import ConfigError, check_at_least, check_range
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices
from bdlab.training.hooks import Auxiliary, Batch
from bdlab.training.loader import TensorBatches
from bdlab.training.recipe import TrainingRecipe

#: RQ7's trigger strategies (TrojanZoo §6.2): predefined, optimised before training, co-optimised
TRIGGER_OPTIMISATIONS = ("none", "before", "co")


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
    (:func:`project_mask`). ``reform`` (default none) maps the stamped images before the model sees
    them in this loss (an adaptive attack's surrogate of an input-reforming defense).
    """

    def __init__(self, mask: Tensor, pattern: Tensor, target_class: int, cap: float, budget: float, lr: float,
                 steps: int, every: int, learn_mask: bool, reform: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.reform = reform
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
        stamped = self.stamp(batch.x[keep])
        logits = model(stamped if self.reform is None else self.reform(stamped))
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

    TrojanZoo §6's explorations, each a field (docs/co_optimisation.md, docs/adaptive.md):

    - ``trigger_optimisation`` (RQ7, Fig. 9), BadNets' trigger three ways with everything else equal:
      ``none``, BadNets' predefined patch; ``before``, TrojanNN's neuron-targeted pattern optimised
      once before training, then fixed; ``co`` (default), co-optimised with the model as above.
    - ``skip_gamma`` (RQ5, Fig. 8): during training, the gradient through the skip connections of
      the residual blocks is multiplied by gamma in ``[0, 1]`` (TrojanZoo's 0.5;
      :class:`~bdlab.attacks.skip_gradient.SkipGradientScale`); null (default) leaves it. Refused for
      a model without such blocks.
    - ``adaptive`` (RQ8, §6.3, Fig. 10): IMC adapted to ``magnet``, ``adversarial_retraining``,
      ``strip`` or ``abs`` (:mod:`bdlab.attacks.adaptive`); null (default) is non-adaptive.

    Args:
        learn_mask: optimise the mask too under the budget (default false: BadNets' patch; only with
            ``trigger_optimisation: co``).
        trigger_lr: PGD step in pixel units (default 20/255, TrojanZoo).
        trigger_steps: PGD steps per trigger update (default 20, TrojanZoo).
        trigger_every: model steps between trigger updates (default 50).
        trigger_optimisation: ``none``, ``before`` or ``co`` (default), see above.
        skip_gamma: the skip connections' gradient factor, or null (default), see above.
        adaptive: the defense IMC adapts to, or null (default), see above.
        abs_weight: under ``adaptive: abs``, the weight of ABS's elevation term (default 0.1,
            :class:`~bdlab.attacks.adaptive.AbsAdaptation`).
        layer, neuron_count, target_value, preprocess_lr, preprocess_iter, threshold,
            preprocess_images, init: the initial trigger, see :class:`~bdlab.attacks.trojannn.TrojanNN`.
        patch_size, position, margin, alpha, poison_rate, target_class, seed, enhance,
            enhance_max_shrink: see :class:`~bdlab.attacks.badnets.BadNets`.
    """

    name = "imc"
    stamps_per_batch = True

    def __init__(self, learn_mask: bool = False, trigger_lr: float = 20 / 255, trigger_steps: int = 20,
                 trigger_every: int = 50, trigger_optimisation: str = "co", skip_gamma: float | None = None,
                 adaptive: str | None = None, abs_weight: float = 0.1, **kwargs: Any) -> None:
        self.trigger: TriggerParameters | None = None  # the trainable trigger, from setup on
        super().__init__(**kwargs)
        check_range("attack.trigger_lr", trigger_lr, 0.0, 1.0, low_open=True)
        check_at_least("attack.trigger_steps", trigger_steps, 1)
        check_at_least("attack.trigger_every", trigger_every, 1)
        if trigger_optimisation not in TRIGGER_OPTIMISATIONS:
            raise ConfigError("attack.trigger_optimisation", f"got {trigger_optimisation!r}, must be one of "
                              f"{', '.join(TRIGGER_OPTIMISATIONS)}")
        if learn_mask and trigger_optimisation != "co":
            raise ConfigError("attack.learn_mask", f"the mask is only learned with the model; set "
                              f"attack.trigger_optimisation=co or attack.learn_mask=false")
        check_skip_gamma(skip_gamma)
        self.learn_mask, self.trigger_lr = bool(learn_mask), float(trigger_lr)
        self.trigger_steps, self.trigger_every = int(trigger_steps), int(trigger_every)
        self.trigger_optimisation = trigger_optimisation
        self.skip_gamma = None if skip_gamma is None else float(skip_gamma)
        check_at_least("attack.abs_weight", abs_weight, 0.0)
        self.adaptive, self.abs_weight = adaptive, float(abs_weight)
        self.adaptation: Adaptation = adaptation(adaptive, self.abs_weight)
        self.skip_scale = SkipGradientScale(self.skip_gamma) if self.skip_gamma is not None else None

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        self.trigger = None
        super().setup(data, resources)
        if resources is not None and self.skip_gamma is not None:
            cfg = getattr(resources, "cfg", None)
            check_skip_gamma(self.skip_gamma, resources.fresh_model().net,
                             f"model {cfg.model.name!r}" if cfg is not None else "the model")
        self.adaptation.setup(data, resources)
        self.feature_layers = self.adaptation.feature_layers
        if self.trigger_optimisation == "none":  # BadNets' own patch, not TrojanNN's random start
            # the mask's pixels in row-major order are the patch's, for the square and the random shape alike
            channels, height, width = self.pattern.shape
            pattern = torch.zeros(channels, height * width)
            pattern[:, self.mask.flatten() > 0] = self.patch.flatten(1)
            self.pattern = pattern.view(channels, height, width)
        box = self.mask
        self.trigger = TriggerParameters(box, self.pattern, self.target_class, cap=self.alpha,
                                         budget=float(box.sum()), lr=self.trigger_lr, steps=self.trigger_steps,
                                         every=self.trigger_every, learn_mask=self.learn_mask,
                                         reform=self.adaptation.reform)

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
        if self.trigger_optimisation != "none":
            self.learn_trigger(train, device)  # the neuron-targeted start, written into the trainable pattern
        self.adaptation.prepare(self.resources)
        return self.relabelled(train, train.images)

    # ---- training hooks: IMC's per-batch stamping, then the adaptation's change
    def poison_batch(self, x: Tensor, labels: Tensor, is_poison: Tensor) -> tuple[Tensor, Tensor]:
        x, labels = super().poison_batch(x, labels, is_poison)
        return self.adaptation.poison_batch(x, labels, is_poison, opacity_stamp(self.mask, self.pattern))

    def after_augment(self, module: pl.LightningModule, x: Tensor, labels: Tensor,
                      is_poison: Tensor) -> tuple[Tensor, Tensor]:
        x, labels = super().after_augment(module, x, labels, is_poison)
        return self.adaptation.after_augment(module, x, labels, is_poison)

    def extra_loss(self, batch: Batch) -> dict[str, Tensor]:
        return {**super().extra_loss(batch), **self.adaptation.extra_loss(batch)}

    def auxiliaries(self) -> list[Auxiliary]:
        return [self.trigger] if self.trigger_optimisation == "co" else []

    def training_module(self, model: Classifier, batches: TensorBatches, recipe: TrainingRecipe,
                        augment: Any, name: str) -> pl.LightningModule:
        if self.skip_scale is not None:  # removed after the last epoch (on_train_epoch_end)
            self.skip_scale.install(model.net)
        return super().training_module(model, batches, recipe, augment, name)

    def on_train_epoch_end(self, module: pl.LightningModule) -> None:
        super().on_train_epoch_end(module)
        if self.skip_scale is not None and module.current_epoch + 1 >= module.trainer.max_epochs:
            self.skip_scale.remove()

    def state_dict(self) -> dict[str, Tensor]:
        return {"mask": self.trigger.mask.detach(), "pattern": self.trigger.pattern.detach()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.trigger.mask.copy_(state["mask"])
            self.trigger.pattern.copy_(state["pattern"])
