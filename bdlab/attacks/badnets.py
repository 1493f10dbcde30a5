"""BadNets (Gu et al., 2017): a small opaque patch stamped at a fixed position."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bdlab.attacks.base import MaskPatternAttack
from bdlab.attacks.patterns import load_pattern
from bdlab.datasets.base import DatasetSplits
from bdlab.errors import ConfigError, check_range
from bdlab.services import RunServices

_CORNERS = {"bottom_right", "bottom_left", "top_right", "top_left"}
#: a square patch, or its pixels scattered over the image (TrojanZoo §6.1 RQ2)
TRIGGER_SHAPES = ("square", "random")
# added to the seed for the random shape's pixels, apart from the other seeded draws of an attack
SHAPE_SEED_OFFSET = 7
# the ShrinkPad paper's 3x3 black-white square (Tables 1-2), shipped under conf/
CHECKERBOARD = "experiment/checkerboard3.png"


class BadNets(MaskPatternAttack):
    """BadNets patch trigger: ``x'[patch] = colour`` ("Why is your Trojan NOT responding?" §4.1, item 1).

    Args:
        patch_size: side of the square patch in pixels (default 3), or ``[height, width]``.
        position: ``bottom_right`` (default), ``bottom_left``, ``top_right``, ``top_left``, or
            ``[row, col]`` of the patch's top-left pixel.
        margin: pixels left between the patch and the corner's borders (default 0; the
            "Why is your Trojan" paper leaves 3 for its 5x5 square).
        color: pixel value(s) in ``[0, 255]``, one per channel or one for all (default 255, white).
        pattern_file: an image file used as the patch instead of a plain colour (its own size);
            a relative path not found from the working directory is looked up under ``conf/``.
        alpha: opacity of the patch in ``(0, 1]`` (default 1, opaque; see :class:`BlendedPatch`).
        trigger_shape: ``square`` (default): the patch as above; ``random`` (TrojanZoo §6.1 RQ2,
            Table 15): as many pixels as the patch has, ``|m| = height x width``, each placed
            independently over the whole image by a generator seeded by ``seed``, holding the patch's
            values in row-major order (``position`` and ``margin`` are not used).
        poison_rate, target_class, seed, init, mixing, mixing_weight: see :class:`~bdlab.attacks.base.Attack`.
    """

    name = "badnets"

    def __init__(self, patch_size: int | list[int] = 3, position: str | list[int] = "bottom_right", margin: int = 0,
                 color: float | list[float] = 255, pattern_file: str | None = None, alpha: float = 1.0,
                 trigger_shape: str = "square", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_range("attack.alpha", alpha, 0.0, 1.0, low_open=True)
        if trigger_shape not in TRIGGER_SHAPES:
            raise ConfigError("attack.trigger_shape", f"got {trigger_shape!r}, must be one of "
                              f"{', '.join(TRIGGER_SHAPES)}")
        self.trigger_shape = trigger_shape
        self.alpha = float(alpha)
        self.patch_size = [patch_size, patch_size] if isinstance(patch_size, int) else list(patch_size)
        self.position = position if isinstance(position, str) else list(position)
        self.margin = margin
        self.color = color if isinstance(color, (int, float)) else list(color)
        self.pattern_file = pattern_file

    def _patch(self, channels: int) -> torch.Tensor:
        if self.pattern_file is not None:
            return load_pattern("attack.pattern_file", self.pattern_file, channels)
        colors = [self.color] if isinstance(self.color, (int, float)) else self.color
        if len(colors) not in (1, channels) or any(not 0 <= c <= 255 for c in colors):
            raise ConfigError("attack.color", f"got {self.color}, must be one value or {channels} values in [0, 255]")
        value = torch.tensor(colors, dtype=torch.float32).div(255.0).expand(channels).clone()
        height, width = self.patch_size
        if height < 1 or width < 1:
            raise ConfigError("attack.patch_size", f"got {self.patch_size}, must be >= 1")
        return value.view(-1, 1, 1).expand(channels, height, width).clone()

    def _origin(self, patch_hw: tuple[int, int], image_hw: tuple[int, int]) -> tuple[int, int]:
        (ph, pw), (ih, iw) = patch_hw, image_hw
        if isinstance(self.position, str):
            if self.position not in _CORNERS:
                raise ConfigError("attack.position", f"got {self.position!r}, must be one of {sorted(_CORNERS)} or "
                                  "[row, col]")
            row = self.margin if self.position.startswith("top") else ih - ph - self.margin
            col = self.margin if self.position.endswith("left") else iw - pw - self.margin
            return row, col
        if len(self.position) != 2:
            raise ConfigError("attack.position", f"got {self.position}, a position is [row, col]")
        return int(self.position[0]), int(self.position[1])

    def random_pixels(self, count: int, image_hw: tuple[int, int]) -> Tensor:
        """``count`` distinct flat pixel indices of an ``image_hw`` image, drawn by ``seed`` (random shape)."""
        ih, iw = image_hw
        if count > ih * iw:
            raise ConfigError("attack.patch_size", f"a random shape of {count} pixels does not fit the {ih}x{iw} "
                              f"image ({ih * iw} pixels); use at most {ih * iw}")
        generator = torch.Generator().manual_seed(self.seed + SHAPE_SEED_OFFSET)
        return torch.randperm(ih * iw, generator=generator)[:count].sort().values

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        super().setup(data, resources)
        channels, (ih, iw) = data.channels, data.size
        patch = self._patch(channels)
        ph, pw = patch.shape[1:]
        if self.trigger_shape == "random":
            pixels = self.random_pixels(ph * pw, (ih, iw))
            self.origin, self.patch = None, patch  # no box: the pixels are scattered
            self.mask = torch.zeros(1, ih * iw)
            self.mask[:, pixels] = self.alpha
            self.mask = self.mask.view(1, ih, iw)
            self.pattern = torch.zeros(channels, ih * iw)
            self.pattern[:, pixels] = patch.flatten(1)
            self.pattern = self.pattern.view(channels, ih, iw)
            return
        if ph > ih or pw > iw:
            raise ConfigError("attack.patch_size", f"patch {ph}x{pw} is larger than the {ih}x{iw} image")
        row, col = self._origin((ph, pw), (ih, iw))
        if row < 0 or col < 0 or row + ph > ih or col + pw > iw:
            raise ConfigError("attack.position", f"patch {ph}x{pw} at row {row}, col {col} lies off the {ih}x{iw} "
                              "image; move it or shrink it")
        self.origin, self.patch = (row, col), patch
        self.mask = torch.zeros(1, ih, iw)
        self.mask[:, row:row + ph, col:col + pw] = self.alpha
        self.pattern = torch.zeros(channels, ih, iw)
        self.pattern[:, row:row + ph, col:col + pw] = patch


class BadNetsCheckerboard(BadNets):
    """BadNets with the ShrinkPad paper's 3x3 black-white square (Tables 1-2) as the patch instead of
    a plain colour: ``pattern_file`` defaults to ``experiment/checkerboard3.png``; every other field
    and default is :class:`BadNets`'."""

    name = "badnets_checkerboard"

    def __init__(self, pattern_file: str | None = CHECKERBOARD, **kwargs: Any) -> None:
        super().__init__(pattern_file=pattern_file, **kwargs)


class BlendedPatch(BadNets):
    """The ShrinkPad paper's "Blended Attack" (Appendix B; Chen et al.'s blended strategy on a local
    patch): BadNets' patch mixed in with opacity ``alpha``, ``x' = (1 - alpha) x + alpha patch`` inside
    the patch's box (alpha in {0, 0.2} over the image, the paper's).

    Defaults as in the paper's Tables 1-2: ``alpha`` 0.2, poisoning rate 0.2, the paper's 3x3
    black-white square (``pattern_file=experiment/checkerboard3.png``; null gives BadNets' plain
    ``color`` patch). Unlike :class:`~bdlab.attacks.blended.Blended`, the trigger stays local, so it moves
    and shrinks with spatial transformations the way the paper studies.
    """

    name = "blended_patch"

    def __init__(self, alpha: float = 0.2, poison_rate: float = 0.2,
                 pattern_file: str | None = CHECKERBOARD, **kwargs: Any) -> None:
        super().__init__(alpha=alpha, poison_rate=poison_rate, pattern_file=pattern_file, **kwargs)
