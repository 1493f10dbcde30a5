"""Input-reformation defenses (TrojanZoo's category): every test input is transformed before the
trojaned model sees it, ``predict(T(x))`` (ShrinkPad paper, Definition 3).

Evaluation protocol (docs/metrics.md), under stable keys:

- ``defense/acc``, ``defense/ccc``: ACC and CCC of the trojaned model on the transformed clean test set;
- ``defense/asr``, ``defense/tmc``: ASR and TMC on the transformed poisoned test set;
- ``defense/acc_before``, ``defense/asr_before``, ``defense/ccc_before``: the undefended values;
- ``defense/ard`` = ASR before - ASR after; ``defense/cad`` = ACC before - ACC after;
- ``defense/time_per_input_ms``: wall time of defended inference (transform + model) per input.

Random transforms draw per-sample parameters from a generator seeded with ``seed`` when the
defense runs, so a run is reproducible.
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor, nn

from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits
from bdlab.defenses.base import ARD, DEFENSE_CAD, Defense, Residual
from bdlab.errors import ConfigError, check_range
from bdlab.evaluate import EVAL_BATCH, Transform, defense_effect, evaluate, model_device
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices
from bdlab.transforms import (
    check_jitter,
    check_shrink,
    check_std,
    color_jitter,
    down_upsample,
    gaussian_noise,
    make_generator,
    random_flip,
    shrink_pad,
)

log = logging.getLogger(__name__)


class InputReformation(Defense):
    """Base of the input-reformation defenses: subclasses define the batched ``transform``.

    Args:
        seed: seeds the per-sample randomness of the transform (default: the run's seed).
    """

    category = "input_reformation"
    headline_metrics = (
        ("defense/acc", "ACC under the defense (%)"),
        ("defense/asr", "ASR under the defense (%)"),
        ARD,
        DEFENSE_CAD,
    )
    residual = Residual("ASR on reformed inputs", asr="defense/asr", cost="defense/cad")

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.generator: torch.Generator | None = None

    @abstractmethod
    def transform(self, x: Tensor) -> Tensor:
        """The reformation of a float batch in ``[0, 1]`` (draws from ``self.generator``)."""

    def defended(self, model: Classifier) -> tuple[nn.Module, Transform | None, int]:
        """The model, input transform and batch size the evaluator runs for the defended model."""
        return model, self.transform, EVAL_BATCH

    def run(self, context: RunServices) -> dict[str, Any]:
        self.generator = make_generator(self.seed, model_device(context.trojan_model()))
        model, transform, batch_size = self.defended(context.trojan_model())
        count = len(context.data.test) + (len(context.poisoned_test) if context.poisoned_test is not None else 0)
        log.info("%s: evaluating the trojaned model on %d reformed test inputs (clean and poisoned)", self.name, count)
        started = time.perf_counter()
        after = evaluate(model, context.data.test, context.poisoned_test, context.attack.target_class, transform,
                         batch_size)
        elapsed = time.perf_counter() - started
        metrics = defense_effect(context.undefended, after)
        metrics["defense/time_per_input_ms"] = 1000.0 * elapsed / count
        return metrics


class Flip(InputReformation):
    """Flip: mirror every test input left-right (ShrinkPad paper, section 5.1, Tables 1-2).

    Args:
        seed: unused by the deterministic flip, kept for a uniform interface.
    """

    name = "flip"

    def transform(self, x: Tensor) -> Tensor:
        return random_flip(x, p=1.0, generator=self.generator)


class ShrinkPad(InputReformation):
    """ShrinkPad-``size``: shrink by ``size`` pixels (bilinear) and zero-pad back at a random offset
    (ShrinkPad paper, section 5.1, Tables 1-2; ablation over the size in Fig. 12).

    Args:
        size: shrink size in pixels (default 4, "ShrinkPad-4"); must leave at least one pixel.
        seed: seeds the padding offsets.
    """

    name = "shrinkpad"

    def __init__(self, size: int = 4, seed: int = 0) -> None:
        super().__init__(seed)
        if size < 0:
            raise ConfigError("defense.size", f"got {size}, a shrink size must be >= 0")
        self.size = int(size)

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        check_shrink("defense.size", self.size, data.size)

    def transform(self, x: Tensor) -> Tensor:
        return shrink_pad(x, self.size, self.generator)


class GaussianNoise(InputReformation):
    """Additive Gaussian noise on every test input (ShrinkPad paper, Appendix D, Table 3).

    Args:
        std: standard deviation in ``[0, 1]`` pixel units (default 10/255; the paper tries
            5, 10, 15, 20 out of 255).
        seed: seeds the noise.
    """

    name = "gaussian_noise"

    def __init__(self, std: float = 10 / 255, seed: int = 0) -> None:
        super().__init__(seed)
        check_std("defense.std", std)
        self.std = float(std)

    def transform(self, x: Tensor) -> Tensor:
        return gaussian_noise(x, self.std, self.generator)


class ColorJitter(InputReformation):
    """One colour shift with a random per-input factor (ShrinkPad paper, Appendix D, Table 4;
    torchvision's ColorJitter semantics).

    Args:
        kind: ``brightness`` (default), ``contrast``, ``saturation`` or ``hue``.
        magnitude: maximum perturbation size (default 0.2; the paper tries 0.1 to 0.4): in
            ``[0, 1]`` for brightness/contrast/saturation (factor in ``[1 - m, 1 + m]``), in
            ``[0, 0.5]`` for hue (shift in ``[-m, m]``).
        seed: seeds the factors.
    """

    name = "color_jitter"

    def __init__(self, kind: str = "brightness", magnitude: float = 0.2, seed: int = 0) -> None:
        super().__init__(seed)
        check_jitter("defense.kind", kind, "defense.magnitude", magnitude)
        self.kind, self.magnitude = kind, float(magnitude)

    def transform(self, x: Tensor) -> Tensor:
        return color_jitter(x, self.kind, self.magnitude, self.generator)


class DownUpsample(InputReformation):
    """Down-sample (anti-aliased) then up-sample back, removing fine trigger detail (TrojanZoo's
    input-reformation family).

    Args:
        ratio: size of the intermediate image relative to the input, in ``(0, 1]`` (default 0.5);
            it must keep at least one pixel.
        seed: unused (deterministic), kept for a uniform interface.
    """

    name = "down_upsample"

    def __init__(self, ratio: float = 0.5, seed: int = 0) -> None:
        super().__init__(seed)
        check_range("defense.ratio", ratio, 0.0, 1.0, low_open=True)
        self.ratio = float(ratio)

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        if round(min(data.size) * self.ratio) < 1:
            raise ConfigError("defense.ratio", f"{self.ratio} shrinks the {data.size[0]}x{data.size[1]} input to no "
                              "pixel; raise it")

    def transform(self, x: Tensor) -> Tensor:
        return down_upsample(x, self.ratio)


class RandomizedSmoothing(InputReformation):
    """Randomized smoothing (Cohen et al., 2019; TrojanZoo's input-reformation family): the
    prediction averages the softmax over ``samples`` Gaussian-noised copies of each input.

    The returned "logits" are the log of the averaged probabilities, so argmax gives the
    smoothed prediction and softmax gives the averaged probabilities (for CCC and TMC).

    Args:
        std: noise standard deviation in ``[0, 1]`` pixel units (default 0.25).
        samples: noisy copies per input (default 10).
        seed: seeds the noise.
    """

    name = "randomized_smoothing"

    def __init__(self, std: float = 0.25, samples: int = 10, seed: int = 0) -> None:
        super().__init__(seed)
        check_std("defense.std", std)
        if samples < 1:
            raise ConfigError("defense.samples", f"got {samples}, must be >= 1")
        self.std, self.samples = float(std), int(samples)

    def transform(self, x: Tensor) -> Tensor:
        return gaussian_noise(x, self.std, self.generator)

    def defended(self, model: Classifier) -> tuple[nn.Module, Transform | None, int]:
        return _Smoothed(model, self), None, max(1, EVAL_BATCH // self.samples)


class _Smoothed(nn.Module):
    """``model`` under randomized smoothing: log of the softmax averaged over the noisy copies."""

    def __init__(self, model: Classifier, smoothing: RandomizedSmoothing) -> None:
        super().__init__()
        self.model, self.smoothing = model, smoothing

    def forward(self, x: Tensor) -> Tensor:
        samples = self.smoothing.samples
        copies = self.smoothing.transform(x.repeat_interleave(samples, 0))
        probabilities = torch.softmax(self.model(copies).float(), 1)
        return probabilities.view(len(x), samples, -1).mean(1).clamp_min(1e-12).log()
