"""Stealthiness of a trigger: how far each poisoned image is from the clean image it was made from
(ISSBA, Li et al. ICCV 2021, Table 1: PSNR and L-infinity; SSIM and L2 as in BackdoorBench).

Every figure is a mean over image pairs of a per-image value, computed in chunks on the device:

- ``psnr``: ``10 log10(1 / MSE)`` on ``[0, 1]`` images (torchmetrics); an image the trigger leaves
  unchanged would have an infinite PSNR, so each image's PSNR is capped at :data:`PSNR_CAP` (100 dB);
- ``ssim``: torchmetrics' SSIM (Gaussian window 11, sigma 1.5), 1.0 for identical images;
- ``linf`` and ``l2``: the largest and the Euclidean norm of the change, in grey levels (0-255, the
  unit of ISSBA's Table 1).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from bdlab.datasets.base import to_float

PSNR_CAP = 100.0
CHUNK = 2048
#: (results key, title) of each stealthiness figure
STEALTH_METRICS = (
    ("attack/psnr", "PSNR of poisoned vs clean test images (dB, higher is stealthier)"),
    ("attack/ssim", "SSIM of poisoned vs clean test images"),
    ("attack/linf", "L-inf change (grey levels, 0-255)"),
    ("attack/l2", "L2 change (grey levels)"),
)


def stealthiness(clean: Tensor, poisoned: Tensor, device: torch.device | str = "cpu") -> dict[str, float]:
    """The ``attack/psnr``, ``attack/ssim``, ``attack/linf`` and ``attack/l2`` of uint8 image pairs
    ``(N, C, H, W)``, ``poisoned[i]`` made from ``clean[i]``."""
    if clean.shape != poisoned.shape or len(clean) == 0:
        raise ValueError(f"stealthiness needs pairs of the same shape, got {tuple(clean.shape)} and "
                         f"{tuple(poisoned.shape)}")
    sums = torch.zeros(4, dtype=torch.float64)
    # SSIM's 11x11 window does not fit images under 11 pixels: shrink it to the largest odd size that does
    kernel = min(11, min(clean.shape[-2:]) - (1 - min(clean.shape[-2:]) % 2))
    for start in range(0, len(clean), CHUNK):
        x = to_float(clean[start:start + CHUNK].to(device))
        y = to_float(poisoned[start:start + CHUNK].to(device))
        psnr = peak_signal_noise_ratio(y, x, data_range=1.0, reduction="none", dim=(1, 2, 3)).clamp(max=PSNR_CAP)
        ssim = structural_similarity_index_measure(y, x, data_range=1.0, kernel_size=kernel, reduction="none")
        change = (y - x).flatten(1) * 255
        values = torch.stack([psnr, ssim, change.abs().amax(1), change.norm(dim=1)])
        sums += values.double().sum(1).cpu()
    means = (sums / len(clean)).tolist()
    return {key: value for (key, _), value in zip(STEALTH_METRICS, means, strict=True)}
