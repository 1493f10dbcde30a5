"""A plus-sign trigger near the bottom-right corner: BadNets' "pattern backdoor" (Gu et al., 2017, section 4:
a small pattern of bright pixels near the corner of an MNIST digit) drawn as a "+"."""

from __future__ import annotations

from typing import Any

import torch

from bdlab.attacks.base import MaskPatternAttack
from bdlab.datasets.base import DatasetSplits
from bdlab.errors import ConfigError
from bdlab.services import RunServices


class PlusPatch(MaskPatternAttack):
    """A white ``+`` of side ``size`` pixels (one-pixel-wide bars), ``margin`` pixels from the bottom-right corner.

    Args:
        size: side of the plus in pixels, odd and >= 3 (default 5).
        margin: pixels between the plus and the image's bottom and right borders (default 1).
        poison_rate, target_class, seed, enhance, enhance_max_shrink: see :class:`bdlab.attacks.base.Attack`.
    """

    name = "plus_patch"

    def __init__(self, size: int = 5, margin: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if size < 3 or size % 2 == 0:
            raise ConfigError("attack.size", f"got {size}, must be odd and >= 3")
        if margin < 0:
            raise ConfigError("attack.margin", f"got {margin}, must be >= 0")
        self.size, self.margin = size, margin

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        super().setup(data, resources)  # checks target_class and poison_rate against the data
        height, width = data.size
        if self.size + self.margin > min(height, width):
            raise ConfigError("attack.size", f"a {self.size}-pixel plus {self.margin} pixels from the corner does "
                              f"not fit the {height}x{width} image")
        bottom, right = height - self.margin, width - self.margin
        top, left, half = bottom - self.size, right - self.size, self.size // 2
        # the trigger is x' = (1 - mask) x + mask pattern (MaskPatternAttack.apply, on any device, batched)
        self.mask = torch.zeros(1, height, width)
        self.mask[0, top + half, left:right] = 1.0  # the horizontal bar
        self.mask[0, top:bottom, left + half] = 1.0  # the vertical bar
        self.pattern = torch.ones(data.channels, height, width)  # white wherever the mask is set
