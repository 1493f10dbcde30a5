"""Standard training augmentation, batched and on the device: random crop with padding, horizontal flip."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from bdlab.transforms import random_flip


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad by ``padding`` and crop back at a random offset drawn independently per sample."""
    if padding == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


class TrainAugment:
    """The dataset's augmentation recipe as one callable on float batches."""

    def __init__(self, crop_padding: int = 0, hflip: bool = False) -> None:
        self.crop_padding, self.hflip = crop_padding, hflip

    def __call__(self, x: Tensor) -> Tensor:
        x = random_crop(x, self.crop_padding)
        return random_flip(x) if self.hflip else x
