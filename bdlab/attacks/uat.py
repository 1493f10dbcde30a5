"""UAT, the universal adversarial trigger ("Why is your Trojan NOT responding?" §4.1 item 5, Eq. 3): a
patch optimised on the clean reference model to send inputs to the target class, then used to poison."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bdlab.attacks.badnets import BadNets
from bdlab.attacks.base import PoisonedSet
from bdlab.datasets.base import ImageSet, to_float
from bdlab.errors import check_at_least, check_range
from bdlab.inversion.engine import InversionEngine, InversionMethod, Trigger, Variables

log = logging.getLogger(__name__)


class PatchPattern(InversionMethod):
    """Eq. 3 on the inversion engine: the pattern inside a fixed patch mask, ``p = (tanh(w) + 1) / 2`` so it
    stays in ``[0, 1]``, started from seeded uniform random values; the loss is the target-class
    cross-entropy of the stamped images (Eq. 3 with ``y`` the target's one-hot). No size objective:
    the engine keeps the most successful pattern, not the last."""

    regularised = False

    def __init__(self, mask: Tensor, lr: float) -> None:
        self.mask, self.lr = mask, lr

    def variables(self, targets: Sequence[int], shape: tuple[int, int, int], seed: int) -> Variables:
        start = torch.rand(shape, generator=torch.Generator().manual_seed(seed)).clamp(0.01, 0.99)
        return {"w": [torch.atanh(2 * start - 1) for _ in targets]}

    def pattern(self, variables: Variables, index: Sequence[int]) -> Tensor:
        return (torch.tanh(torch.stack([variables["w"][k] for k in index])) + 1) / 2

    def stamp(self, variables: Variables, index: Sequence[int], x: Tensor) -> Tensor:
        mask = self.mask.to(x.device, x.dtype)
        return x + mask * (self.pattern(variables, index)[:, None] - x)

    def regulariser(self, variables: Variables, index: Sequence[int], x: Tensor) -> Tensor:
        return torch.zeros(len(index), device=x.device)

    def size(self, variables: Variables, index: Sequence[int]) -> Tensor:
        return torch.full((len(index),), float(self.mask.sum()))

    def trigger(self, variables: Variables, index: Sequence[int]) -> Trigger:
        pattern = self.pattern(variables, index).detach().cpu()
        mask = self.mask.expand(len(index), *self.mask.shape).clone()
        return Trigger(mask, pattern, torch.zeros_like(pattern))


class UAT(BadNets):
    """Universal adversarial trigger ("Why is your Trojan NOT responding?", Tian et al. 2022, §4.1 item 5,
    Eq. 3; after Moosavi-Dezfooli et al.'s universal perturbations): a patch-shaped trigger whose values
    start random and are optimised on the clean reference model,

        t = argmin_t sum_i CE(h(x_i (+) t), target),

    over ``optimisation_images`` clean non-target training images (Adam, ``trigger_lr``, for
    ``trigger_epochs`` passes on the inversion engine, which keeps the most successful pattern). The
    optimised patch is then BadNets' trigger: ``poison_rate`` of the training set is stamped and
    relabelled (the paper poisons 10% on MNIST) and the model is trained on it.

    Defaults (the paper's MNIST setting, Table 2: ACC 97.01, ASR 90.06): an 8x8 patch in the
    bottom-right corner, ``margin`` 3; ``trigger_epochs`` 20, ``trigger_lr`` 0.1, ``batch_size`` 100,
    ``optimisation_images`` 1000. The learned pattern is stored with the trojaned model.

    Args:
        trigger_epochs: passes of the pattern optimisation over the optimisation images.
        trigger_lr: Adam step on the pattern's tanh parameters.
        batch_size: images per optimisation step.
        optimisation_images: clean non-target training images the pattern is optimised on.
        patch_size, position, margin, poison_rate, target_class, seed, enhance, enhance_max_shrink:
            see :class:`~bdlab.attacks.badnets.BadNets` (``color``, ``pattern_file`` and ``alpha`` are
            BadNets' and not used: the pattern is learned, opaque).
    """

    name = "uat"

    def __init__(self, patch_size: int | list[int] = 8, margin: int = 3, trigger_epochs: int = 20,
                 trigger_lr: float = 0.1, batch_size: int = 100, optimisation_images: int = 1000,
                 **kwargs: Any) -> None:
        super().__init__(patch_size=patch_size, margin=margin, **kwargs)
        check_at_least("attack.trigger_epochs", trigger_epochs, 1)
        check_at_least("attack.batch_size", batch_size, 1)
        check_at_least("attack.optimisation_images", optimisation_images, 1)
        check_range("attack.trigger_lr", trigger_lr, 0.0, 10.0, low_open=True)
        self.trigger_epochs, self.trigger_lr = int(trigger_epochs), float(trigger_lr)
        self.batch_size, self.optimisation_images = int(batch_size), int(optimisation_images)

    def learn_trigger(self, train: ImageSet, device: torch.device | str) -> None:
        """Eq. 3 on the clean reference model; writes the most successful pattern into the patch."""
        keep = (train.labels != self.target_class).nonzero().flatten()
        chosen = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(self.seed))]
        chosen = chosen[:self.optimisation_images]
        engine = InversionEngine(PatchPattern(self.mask, self.trigger_lr), epochs=self.trigger_epochs,
                                 batch_size=self.batch_size, threshold=1.0, seed=self.seed)
        result = engine.run(self.resources.clean_model(), to_float(train.images[chosen]).to(device),
                            train.labels[chosen], [self.target_class])
        self.pattern = torch.where(self.mask > 0, result.trigger.pattern[0], torch.zeros_like(self.pattern))
        log.info("uat trigger: %.1f%% of the optimisation images go to class %d on the clean model",
                 100 * float(result.success[0]), self.target_class)

    def training_set(self, train: ImageSet, device: torch.device | str = "cpu") -> PoisonedSet:
        self.learn_trigger(train, device)
        return super().training_set(train, device)

    def state_dict(self) -> dict[str, Tensor]:
        return {"pattern": self.pattern}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.pattern = state["pattern"].detach().cpu().clone()
