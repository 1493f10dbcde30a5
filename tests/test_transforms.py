"""Batched transforms on hand-built images: exact outputs, per-sample randomness, seeded determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from bdlab.errors import ConfigError
from bdlab.transforms import (
    check_jitter,
    check_scale,
    check_shrink,
    check_std,
    circle_offsets,
    color_jitter,
    down_upsample,
    gaussian_noise,
    make_generator,
    random_flip,
    random_shrink_pad,
    rotate,
    scale,
    shrink_pad,
    translate_fill,
    translate_wrap,
)


def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact cache for the session's tiny runs, so the defense, analysis and label-consistent
    tests train their identical clean (and trojaned) models once."""
    return tmp_path_factory.getbasetemp() / "issue3-shared-cache"


def ramp(n: int = 1, c: int = 1, h: int = 6, w: int = 6) -> torch.Tensor:
    return (torch.arange(n * c * h * w, dtype=torch.float32) / (n * c * h * w)).view(n, c, h, w)


def gen(seed: int = 0) -> torch.Generator:
    return make_generator(seed, "cpu")


def test_flip_mirrors_every_sample_at_p1_and_some_at_half() -> None:
    x = ramp(64)
    assert torch.equal(random_flip(x, 1.0, gen()), x.flip(-1))
    half = random_flip(x, 0.5, gen())
    flipped = (half == x.flip(-1)).flatten(1).all(1)
    assert 0 < flipped.sum() < 64
    assert torch.equal(half, random_flip(x, 0.5, gen()))


def test_shrinkpad_is_bilinear_shrink_placed_at_its_offset() -> None:
    x = torch.rand(16, 2, 10, 12)
    out = shrink_pad(x, 3, gen())
    small = F.interpolate(x, size=(7, 9), mode="bilinear", align_corners=False)
    offsets = set()
    for i in range(16):
        nonzero = out[i].abs().sum(0).nonzero()
        top, left = nonzero.min(0).values.tolist()
        assert torch.allclose(out[i, :, top:top + 7, left:left + 9], small[i], atol=1e-5)
        assert out[i].abs().sum() == pytest.approx(out[i, :, top:top + 7, left:left + 9].abs().sum().item())
        assert 0 <= top <= 3 and 0 <= left <= 3
        offsets.add((top, left))
    assert len(offsets) > 1  # offsets drawn per sample
    assert torch.equal(out, shrink_pad(x, 3, gen()))
    assert not torch.equal(out, shrink_pad(x, 3, gen(1)))


def test_shrinkpad_of_a_constant_image_is_a_constant_block_in_black() -> None:
    out = shrink_pad(torch.ones(1, 1, 8, 8), 2, gen())
    assert out.sum() == 36 and set(out.unique().tolist()) == {0.0, 1.0}


def test_shrinkpad_size_zero_is_identity_and_per_sample_sizes_work() -> None:
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(shrink_pad(x, 0, gen()), x)
    out = shrink_pad(torch.ones(3, 1, 8, 8), torch.tensor([0, 1, 4]), gen())
    assert out.sum((1, 2, 3)).tolist() == [64, 49, 16]


def test_random_shrinkpad_draws_sizes_per_sample() -> None:
    out = random_shrink_pad(torch.ones(200, 1, 8, 8), 4, gen())
    areas = set(out.sum((1, 2, 3)).tolist())
    assert areas == {64.0, 49.0, 36.0, 25.0, 16.0}
    assert torch.equal(out, random_shrink_pad(torch.ones(200, 1, 8, 8), 4, gen()))


def test_gaussian_noise_std_clip_and_seed() -> None:
    x = torch.full((50, 1, 16, 16), 0.5)
    out = gaussian_noise(x, 0.05, gen())
    assert (out - x).std().item() == pytest.approx(0.05, rel=0.05)
    assert torch.equal(out, gaussian_noise(x, 0.05, gen()))
    assert not torch.equal(out[0], out[1])
    assert gaussian_noise(torch.ones(2, 1, 4, 4), 1.0, gen()).max() <= 1.0
    assert torch.equal(gaussian_noise(x, 0.0, gen()), x)


def test_color_jitter_brightness_contrast_saturation_exact() -> None:
    x = torch.rand(20, 3, 5, 5) * 0.5
    out = color_jitter(x, "brightness", 0.4, gen())
    factors = (out / x).flatten(1)
    assert torch.allclose(factors, factors[:, :1].expand_as(factors), atol=1e-4)  # one factor per image
    assert ((factors[:, 0] >= 0.6 - 1e-4) & (factors[:, 0] <= 1.4 + 1e-4)).all()
    assert factors[:, 0].unique().numel() > 10
    assert torch.equal(out, color_jitter(x, "brightness", 0.4, gen()))
    grey = torch.full((3, 1, 4, 4), 0.3)
    assert torch.allclose(color_jitter(grey, "contrast", 0.5, gen()), grey)  # a flat image has no contrast
    assert torch.equal(color_jitter(grey, "saturation", 0.5, gen()), grey)
    assert torch.equal(color_jitter(grey, "hue", 0.5, gen()), grey)
    for kind in ("brightness", "contrast", "saturation", "hue"):
        assert torch.allclose(color_jitter(x, kind, 0.0, gen()), x, atol=1e-5)


def test_color_jitter_hue_turns_the_colour_wheel() -> None:
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1.0
    # a third of a turn maps pure red to pure green: check with the internal shift fixed
    from bdlab.transforms import _hsv_to_rgb, _rgb_to_hsv
    hsv = _rgb_to_hsv(red)
    hsv[:, 0] = (hsv[:, 0] + 1 / 3) % 1
    assert torch.allclose(_hsv_to_rgb(hsv), torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2))
    x = torch.rand(8, 3, 4, 4)
    assert torch.allclose(_hsv_to_rgb(_rgb_to_hsv(x)), x, atol=1e-5)
    shifted = color_jitter(x, "hue", 0.5, gen())
    assert torch.allclose(shifted.max(1).values, x.max(1).values, atol=1e-5)  # hue keeps the value channel


def test_down_upsample_keeps_flat_images_and_blurs_detail() -> None:
    flat = torch.full((2, 1, 8, 8), 0.7)
    assert torch.allclose(down_upsample(flat, 0.5), flat, atol=1e-6)
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None]) % 2).float().view(1, 1, 8, 8)
    # the anti-aliasing filter averages the checkerboard to grey (up to its border renormalisation)
    assert torch.allclose(down_upsample(checker, 0.5), torch.full_like(checker, 0.5), atol=0.02)


def test_translate_wrap_and_fill() -> None:
    x = ramp(1, 1, 4, 4)
    assert torch.equal(translate_wrap(x, 1, -1)[0, 0, 1, 0], x[0, 0, 0, 1])
    assert torch.equal(translate_wrap(x, 4, 4), x)
    filled = translate_fill(x, 1, 2)
    assert torch.equal(filled[..., 1:, 2:], x[..., :3, :2]) and filled[..., 0, :].sum() == 0
    assert translate_fill(x, -5, 0).sum() == 0


def test_rotate_90_is_rot90_and_about_a_patch_centre() -> None:
    x = ramp(2, 1, 5, 5)
    assert torch.equal(rotate(x, 90), torch.rot90(x, -1, (2, 3)))  # clockwise
    assert torch.equal(rotate(x, 0), x)
    patch = torch.zeros(1, 1, 10, 10)
    patch[..., 5:8, 5:8] = 1.0
    assert torch.equal(rotate(patch, 90, (6.5, 6.5)), patch)  # a square about its own centre
    rows, cols = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    diamond = ((rows - 6).abs() + (cols - 6).abs() <= 2).float().view(1, 1, 10, 10)
    assert torch.equal(rotate(patch, 45, (6.5, 6.5)), diamond)  # nearest-neighbour turns the square into a diamond


def test_scale_nearest_black_fill() -> None:
    x = torch.ones(1, 1, 8, 8)
    small = scale(x, 0.5)
    assert small.sum() == 16 and small[..., 0, :].sum() == 0
    big = scale(ramp(1, 1, 8, 8), 2.0)
    assert set(big.flatten().tolist()) <= set(ramp(1, 1, 8, 8).flatten().tolist())
    assert torch.equal(scale(x, 1.0), x)


def test_circle_offsets() -> None:
    assert len(set(circle_offsets(1))) == 8 and (0, 1) in circle_offsets(1)
    assert all(abs((dy * dy + dx * dx) ** 0.5 - 3) < 0.5 for dy, dx in circle_offsets(3))


@pytest.mark.parametrize("check, args", [
    (check_shrink, ("f", 8, (8, 8))), (check_shrink, ("f", -1, (8, 8))), (check_std, ("f", -0.1)),
    (check_jitter, ("k", "blur", "m", 0.1)), (check_jitter, ("k", "hue", "m", 0.6)),
    (check_jitter, ("k", "brightness", "m", 1.5)), (check_scale, ("f", 0.0)),
])
def test_bad_parameters_raise_config_error(check, args) -> None:
    with pytest.raises(ConfigError):
        check(*args)
