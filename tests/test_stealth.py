"""Stealthiness metrics on hand-built images: PSNR, SSIM, L-inf and L2 of poisoned vs clean pairs."""

from __future__ import annotations

import math

import pytest
import torch

from bdlab.stealth import PSNR_CAP, stealthiness


def grey(n: int = 3, value: int = 100, size: int = 28) -> torch.Tensor:
    return torch.full((n, 1, size, size), value, dtype=torch.uint8)


def test_identical_images_hit_the_documented_psnr_cap_and_change_nothing() -> None:
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    metrics = stealthiness(images, images.clone())
    assert metrics == pytest.approx({"attack/psnr": PSNR_CAP, "attack/ssim": 1.0, "attack/linf": 0.0,
                                     "attack/l2": 0.0})


def test_one_flipped_pixel_gives_the_closed_form_psnr_linf_and_l2() -> None:
    clean = grey(value=0)
    poisoned = clean.clone()
    poisoned[:, 0, 27, 27] = 255  # MSE = 1/784 of the range squared
    metrics = stealthiness(clean, poisoned)
    assert metrics["attack/psnr"] == pytest.approx(10 * math.log10(784), rel=1e-5)
    assert metrics["attack/linf"] == pytest.approx(255.0)
    assert metrics["attack/l2"] == pytest.approx(255.0)
    assert metrics["attack/ssim"] < 1.0


def test_a_uniform_shift_and_a_mean_over_pairs() -> None:
    clean = grey(n=2, value=100)
    poisoned = clean.clone()
    poisoned[0] += 10  # 10 levels everywhere on the first image, the second unchanged
    metrics = stealthiness(clean, poisoned)
    assert metrics["attack/psnr"] == pytest.approx((20 * math.log10(25.5) + PSNR_CAP) / 2, rel=1e-5)
    assert metrics["attack/linf"] == pytest.approx(5.0)
    assert metrics["attack/l2"] == pytest.approx(10 * 28 / 2, rel=1e-5)


def test_a_larger_change_is_less_stealthy_on_every_metric() -> None:
    clean = torch.randint(60, 190, (4, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    noise = torch.randint(-1, 2, clean.shape, generator=torch.Generator().manual_seed(1))
    small = (clean.int() + 4 * noise).clamp(0, 255).to(torch.uint8)
    large = (clean.int() + 40 * noise).clamp(0, 255).to(torch.uint8)
    a, b = stealthiness(clean, small), stealthiness(clean, large)
    assert a["attack/psnr"] > b["attack/psnr"] and a["attack/ssim"] > b["attack/ssim"]
    assert a["attack/linf"] < b["attack/linf"] and a["attack/l2"] < b["attack/l2"]


def test_images_smaller_than_the_ssim_window_still_score() -> None:
    clean = grey(size=8)
    assert stealthiness(clean, clean.clone())["attack/ssim"] == pytest.approx(1.0)


def test_pairs_of_different_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="same shape"):
        stealthiness(grey(n=2), grey(n=3))
