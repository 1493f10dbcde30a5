"""Targeted backdoor (Chen et al., 2017), TrojanZoo's "Tb": BadNets' patch at a random position per image."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from bdlab.attacks.badnets import BadNets
from bdlab.attacks.base import map_batches
from bdlab.errors import ConfigError


def place_patches(x: Tensor, patch: Tensor, alpha: float, rows: Tensor, cols: Tensor) -> Tensor:
    """Blend ``patch`` ``(C, h, w)`` with opacity ``alpha`` into each image of ``x`` ``(N, C, H, W)`` with its
    top-left pixel at ``(rows[i], cols[i])``, vectorised over the batch."""
    _, _, height, width = x.shape
    ph, pw = patch.shape[1:]
    dy = torch.arange(height, device=x.device)[None, :] - rows[:, None]  # (N, H): row inside the patch
    dx = torch.arange(width, device=x.device)[None, :] - cols[:, None]
    inside = ((dy >= 0) & (dy < ph))[:, :, None] & ((dx >= 0) & (dx < pw))[:, None, :]  # (N, H, W)
    values = patch.to(x.device, x.dtype)[:, dy.clamp(0, ph - 1)[:, :, None], dx.clamp(0, pw - 1)[:, None, :]]
    mask = inside[:, None].to(x.dtype) * alpha
    return x + mask * (values.permute(1, 0, 2, 3) - x)


class Targeted(BadNets):
    """TrojanZoo's targeted backdoor "Tb" (§4.1; Chen, Liu, Li, Lu and Song, "Targeted Backdoor Attacks
    on Deep Learning Systems Using Data Poisoning", 2017): BadNets' patch (``patch_size``, ``color`` or
    ``pattern_file``, opacity ``alpha``) stamped at a position drawn uniformly per image, so the
    trojaned model responds to the trigger wherever it is.

    Training stamps the flagged ``poison_rate`` share of every batch at fresh random positions each
    time it is seen (per-batch poisoning, drawn from the training recipe's seeded RNG); the poisoned
    sets handed over or tested (training set, test set) are stamped once with positions from a
    generator seeded by ``seed``. There is no fixed trigger mask, so metrics that compare a
    recovered mask with the true one (MJS) do not apply (TrojanZoo Table 12 leaves them undefined).

    Args: see :class:`~bdlab.attacks.badnets.BadNets` (``position`` and ``margin`` are not used;
    ``trigger_shape`` is ``square`` only: the square is what moves).
    """

    name = "targeted"
    stamps_per_batch = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.trigger_shape != "square":
            raise ConfigError("attack.trigger_shape", "targeted moves a square patch to a random position per image; "
                              "leave attack.trigger_shape=square (random shapes: attack=badnets)")

    def apply(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The patch at a uniformly random position per image (``generator`` on ``x``'s device; None = global RNG)."""
        count, _, height, width = x.shape
        ph, pw = self.patch.shape[1:]
        rows = torch.randint(0, height - ph + 1, (count,), device=x.device, generator=generator)
        cols = torch.randint(0, width - pw + 1, (count,), device=x.device, generator=generator)
        return place_patches(x, self.patch, self.alpha, rows, cols)

    def stamp(self, images: Tensor, device: torch.device | str = "cpu") -> Tensor:
        generator = torch.Generator(device=device).manual_seed(self.seed)
        return map_batches(lambda x, _: self.apply(x, generator), images, device)

    @property
    def trigger_mask(self) -> None:
        return None

    @property
    def trigger_pattern(self) -> None:
        return None
