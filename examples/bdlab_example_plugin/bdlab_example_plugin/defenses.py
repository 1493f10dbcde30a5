"""Median filtering of every test input: the local spatial smoothing squeezer of feature squeezing (Xu, Evans
and Qi, "Feature Squeezing: Detecting Adversarial Examples in Deep Neural Networks", NDSS 2018, section 3.2)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits
from bdlab.defenses.input_reformation.base import InputReformation
from bdlab.errors import ConfigError


class MedianFilter(InputReformation):
    """Replace each pixel of each channel by the median of the ``window`` x ``window`` square around it (borders
    replicated). Strokes thinner than half the window vanish; a blob survives (the 3x3 middle of a plus, too).

    Args:
        window: side of the square in pixels, odd and >= 1 (default 3; feature squeezing's 2x2 and 3x3).
        seed: unused (the filter is deterministic), kept for a uniform interface.
    """

    name = "median_filter"

    def __init__(self, window: int = 3, seed: int = 0) -> None:
        super().__init__(seed)
        if window < 1 or window % 2 == 0:
            raise ConfigError("defense.window", f"got {window}, must be odd and >= 1")
        self.window = window

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        if self.window > min(data.size):
            raise ConfigError("defense.window", f"got {self.window}, larger than the {data.size[0]}x{data.size[1]} "
                              "input")

    def transform(self, x: Tensor) -> Tensor:
        half = self.window // 2
        padded = F.pad(x, (half, half, half, half), mode="replicate")
        squares = padded.unfold(2, self.window, 1).unfold(3, self.window, 1)  # (N, C, H, W, window, window)
        return squares.reshape(*x.shape, -1).median(-1).values
