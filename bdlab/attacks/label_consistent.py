"""Label-consistent backdoor (Turner et al., 2019), as configured in the ShrinkPad paper (Appendix B)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from bdlab.attacks.base import STAMP_CHUNK, MaskPatternAttack, PoisonedSet
from bdlab.cache import ArtifactCache
from bdlab.datasets.base import DatasetSplits, ImageSet, to_float, to_uint8
from bdlab.errors import ConfigError, check_range
from bdlab.models.classifier import Classifier

# Turner et al.'s 3x3 black-and-white corner pattern; it is its own mirror image, so the
# four-corner trigger is symmetric under flips (why Flip cannot remove it: ShrinkPad paper, section 5.1)
CORNER_PATTERN = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


def pgd_untargeted(model: Classifier, x: Tensor, labels: Tensor, epsilon: float, step: float,
                   iterations: int) -> Tensor:
    """L-infinity PGD (Madry et al.) that maximises the cross-entropy of the true label; no random start."""
    model.eval()
    adversarial = x.clone()
    for _ in range(iterations):
        adversarial.requires_grad_(True)
        loss = F.cross_entropy(model(adversarial), labels)
        (grad,) = torch.autograd.grad(loss, adversarial)
        with torch.no_grad():
            adversarial = adversarial + step * grad.sign()
            adversarial = torch.min(torch.max(adversarial, x - epsilon), x + epsilon).clamp_(0.0, 1.0)
    return adversarial.detach()


class LabelConsistent(MaskPatternAttack):
    """Label-consistent attack (Turner et al., 2019; ShrinkPad paper Appendix B, Tables 1-2 "Consistent Attack").

    A share ``poison_rate`` of the *target-class* training images is first made hard to learn
    from its natural features with an untargeted L-infinity PGD perturbation computed on a
    clean surrogate, then stamped with a four-corner 3x3 checkerboard blended with weight
    ``amplitude`` (Eq. 1 with alpha in {0, amplitude}); labels stay correct (clean-label). At
    test time the trigger is stamped with ``test_amplitude`` (Turner et al. keep the reduced
    amplitude for training only and test with the fully visible pattern).

    The surrogate is the run's clean reference model (same data, recipe and seed), handed over
    by the pipeline through :meth:`use_clean_model`; the perturbed images are computed once and
    kept as uint8 in the artifact cache under ``poisoned/label_consistent``.

    Known limitation: Turner et al. perturb with an adversarially *trained* surrogate (or GAN
    interpolation), whose perturbations change robust features. With bdlab's standard clean
    surrogate on MNIST / LeNet (epsilon 0.3, 20 steps) the trojaned model learns the
    perturbations themselves as class evidence (99.6% on the perturbed images) and ignores the
    trigger: ASR 0.15% (README). A robust surrogate is not implemented yet.

    Args:
        poison_rate: share of the target class poisoned (default 0.25, the paper's).
        amplitude: trigger blending weight on poisoned training images (default 0.25).
        test_amplitude: trigger blending weight on test inputs (default 1.0).
        epsilon: L-infinity budget of the PGD perturbation in ``[0, 1]`` pixel units (default 8/255).
        step: PGD step size (default 2/255).
        iterations: PGD steps (default 10; 0 = trigger only, no perturbation).
        target_class, seed, enhance, enhance_max_shrink: see :class:`~bdlab.attacks.base.Attack`.
    """

    name = "label_consistent"
    clean_label = True

    def __init__(self, poison_rate: float = 0.25, amplitude: float = 0.25, test_amplitude: float = 1.0,
                 epsilon: float = 8 / 255, step: float = 2 / 255, iterations: int = 10, **kwargs: Any) -> None:
        super().__init__(poison_rate=poison_rate, **kwargs)
        check_range("attack.amplitude", amplitude, 0.0, 1.0, low_open=True)
        check_range("attack.test_amplitude", test_amplitude, 0.0, 1.0, low_open=True)
        check_range("attack.epsilon", epsilon, 0.0, 1.0)
        check_range("attack.step", step, 0.0, 1.0)
        if iterations < 0:
            raise ConfigError("attack.iterations", f"got {iterations}, must be >= 0")
        self.amplitude, self.test_amplitude = float(amplitude), float(test_amplitude)
        self.epsilon, self.step, self.iterations = float(epsilon), float(step), int(iterations)
        self._surrogate: tuple[Classifier, ArtifactCache, str] | None = None

    def setup(self, data: DatasetSplits) -> None:
        super().setup(data)
        channels, (height, width) = data.channels, data.size
        size = CORNER_PATTERN.shape[0]
        if height < 2 * size or width < 2 * size:
            raise ConfigError("dataset", f"{height}x{width} images are too small for the four-corner {size}x{size} "
                              "trigger")
        corners = torch.zeros(height, width)
        pattern = torch.zeros(height, width)
        for rows in (slice(0, size), slice(height - size, height)):
            for cols in (slice(0, size), slice(width - size, width)):
                corners[rows, cols] = 1.0
                pattern[rows, cols] = CORNER_PATTERN
        self.corners = corners[None]
        self.pattern = pattern[None].expand(channels, height, width).clone()
        self.mask = self.corners * self.test_amplitude  # what apply() (test-time stamping) blends with

    def use_clean_model(self, model: Classifier, cache: ArtifactCache, model_key: str) -> None:
        self._surrogate = (model, cache, model_key)

    def _perturb(self, images: Tensor, labels: Tensor, model: Classifier) -> Tensor:
        device = next(model.parameters()).device
        out = torch.empty_like(images)
        for start in range(0, len(images), STAMP_CHUNK):
            x = to_float(images[start:start + STAMP_CHUNK].to(device))
            y = labels[start:start + STAMP_CHUNK].to(device)
            out[start:start + STAMP_CHUNK] = to_uint8(
                pgd_untargeted(model, x, y, self.epsilon, self.step, self.iterations)).cpu()
        return out

    def perturbed(self, images: Tensor, labels: Tensor) -> Tensor:
        """The PGD-perturbed uint8 copies of ``images`` (from the cache when computed before)."""
        if self._surrogate is None:
            raise RuntimeError("label_consistent needs the clean surrogate: the pipeline calls use_clean_model() "
                               "before poisoning")
        model, cache, model_key = self._surrogate
        spec = {"attack": self.name, "surrogate": model_key, "epsilon": self.epsilon, "step": self.step,
                "iterations": self.iterations,
                "images": hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()}
        tensors, _ = cache.get_or_build("poisoned/label_consistent", spec,
                                        lambda: {"images": self._perturb(images, labels, model)})
        return tensors["images"]

    def poison_train(self, train: ImageSet, device: torch.device | str = "cpu") -> PoisonedSet:
        """Perturb, then stamp with ``amplitude``, the poisoned target-class images; labels unchanged."""
        index = self.poison_indices(train.labels)
        perturbed = to_float(self.perturbed(train.images[index], train.labels[index]))
        mask = self.corners * self.amplitude
        images = train.images.clone()
        images[index] = to_uint8(perturbed + mask * (self.pattern - perturbed))
        flags = torch.zeros(len(train), dtype=torch.bool)
        flags[index] = True
        return PoisonedSet(images, train.labels.clone(), flags)
