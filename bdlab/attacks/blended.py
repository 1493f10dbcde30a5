"""Blended injection (Chen et al., 2017): a full-image pattern mixed in with weight alpha."""

from __future__ import annotations

from typing import Any

import torch

from bdlab.attacks.base import MaskPatternAttack
from bdlab.attacks.patterns import load_pattern
from bdlab.datasets.base import DatasetSplits
from bdlab.errors import check_range
from bdlab.services import RunServices


class Blended(MaskPatternAttack):
    """``x' = (1 - alpha) * x + alpha * pattern`` ("Why is your Trojan NOT responding?" Eq. 1 with lambda = 1 - alpha).

    Args:
        alpha: weight of the pattern, in ``[0, 1]`` (default 0.2, Chen et al.).
        pattern_file: an image file resized to the input size; by default seeded uniform noise.
        poison_rate, target_class, seed: see :class:`~bdlab.attacks.base.Attack`.
    """

    name = "blended"

    def __init__(self, alpha: float = 0.2, pattern_file: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_range("attack.alpha", alpha, 0.0, 1.0)
        self.alpha = alpha
        self.pattern_file = pattern_file

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        super().setup(data, resources)
        channels, (height, width) = data.channels, data.size
        if self.pattern_file is not None:
            self.pattern = load_pattern("attack.pattern_file", self.pattern_file, channels, (height, width))
        else:
            generator = torch.Generator().manual_seed(self.seed)
            self.pattern = torch.rand(channels, height, width, generator=generator)
        self.mask = torch.full((1, height, width), float(self.alpha))
