"""Batched image transforms on float batches ``(N, C, H, W)`` in ``[0, 1]``, on any device.

Random transforms draw their parameters independently per sample from ``generator`` (a
``torch.Generator`` on the batch's device; None = the global RNG), so a seeded generator
gives the same output twice. Deterministic geometric operations (translate, scale, rotate)
serve the robustness analyses of "Why is your Trojan NOT responding?" (section 4.2).
Everything is vectorised over the batch: no Python loop over images.

Geometric centres are continuous ``(x, y)`` coordinates in which pixel ``i`` spans
``[i, i + 1)``: the centre of a ``k x k`` patch whose top-left pixel is ``(r, c)`` is
``(c + k / 2, r + k / 2)``, the image centre ``(W / 2, H / 2)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from bdlab.errors import ConfigError, check_range

JITTER_KINDS = ("brightness", "contrast", "saturation", "hue")


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``."""
    return torch.Generator(device=device).manual_seed(int(seed))


def _uniform(n: int, low: float, high: float, like: Tensor, generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * torch.rand(n, device=like.device, generator=generator, dtype=like.dtype)


# ----------------------------------------------------------------------------- flip

def random_flip(x: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each sample left-right with probability ``p`` (``p = 1``: the Flip defense)."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


# ----------------------------------------------------------------------------- ShrinkPad

def check_shrink(field: str, size: int, image_hw: tuple[int, int]) -> None:
    """Refuse shrink sizes that are negative or leave no image."""
    if size < 0 or size >= min(image_hw):
        raise ConfigError(field, f"got {size}, must be in [0, {min(image_hw) - 1}] for {image_hw[0]}x{image_hw[1]} "
                          "images (the shrunk image needs at least one pixel)")


def shrink_pad(x: Tensor, size: int | Tensor, generator: torch.Generator | None = None) -> Tensor:
    """ShrinkPad: shrink by ``size`` pixels (bilinear), zero-pad back to ``H x W`` at a random offset.

    ``size`` is one int for the batch or an int tensor ``(N,)`` with one shrink per sample
    (the enhanced attacks draw it). Shrinking is exactly ``F.interpolate(..., "bilinear",
    align_corners=False)`` to ``(H - size, W - size)``; the shrunk image's top-left corner
    lands at a per-sample offset drawn uniformly from ``{0, ..., size}`` in each direction.
    Implemented as one ``grid_sample`` so samples with different shrinks share a batch.
    """
    n, _, h, w = x.shape
    sizes = torch.as_tensor(size, device=x.device).long().expand(n)
    if (sizes == 0).all():
        return x.clone()
    # per-sample offsets in {0, ..., size}
    top = (torch.rand(n, device=x.device, generator=generator) * (sizes + 1)).floor().long()
    left = (torch.rand(n, device=x.device, generator=generator) * (sizes + 1)).floor().long()
    inner_h, inner_w = (h - sizes).to(x.dtype), (w - sizes).to(x.dtype)
    rows = torch.arange(h, device=x.device, dtype=x.dtype)
    cols = torch.arange(w, device=x.device, dtype=x.dtype)
    # output pixel i of the shrunk region samples source coordinate (i - top + 0.5) * H / h' - 0.5,
    # which is what bilinear interpolation with align_corners=False does
    src_y = (rows[None] - top[:, None] + 0.5) * (h / inner_h)[:, None] - 0.5
    src_x = (cols[None] - left[:, None] + 0.5) * (w / inner_w)[:, None] - 0.5
    grid = torch.stack([
        ((2 * src_x + 1) / w - 1)[:, None, :].expand(n, h, w),
        ((2 * src_y + 1) / h - 1)[:, :, None].expand(n, h, w)], dim=-1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside_y = (rows[None] >= top[:, None]) & (rows[None] < (top + h - sizes)[:, None])
    inside_x = (cols[None] >= left[:, None]) & (cols[None] < (left + w - sizes)[:, None])
    inside = inside_y[:, None, :, None] & inside_x[:, None, None, :]
    return torch.where(inside, out, torch.zeros((), device=x.device, dtype=x.dtype))


def random_shrink_pad(x: Tensor, max_size: int, generator: torch.Generator | None = None) -> Tensor:
    """ShrinkPad with a shrink size drawn uniformly from ``{0, ..., max_size}`` per sample."""
    sizes = torch.randint(0, max_size + 1, (x.shape[0],), device=x.device, generator=generator)
    return shrink_pad(x, sizes, generator)


# ----------------------------------------------------------------------------- appearance

def check_std(field: str, std: float) -> None:
    if not std >= 0:  # also refuses NaN
        raise ConfigError(field, f"got {std}, a standard deviation must be >= 0 (in [0, 1] pixel units)")


def gaussian_noise(x: Tensor, std: float, generator: torch.Generator | None = None) -> Tensor:
    """Additive zero-mean Gaussian noise (std in ``[0, 1]`` pixel units), clipped to ``[0, 1]``."""
    noise = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype)
    return (x + std * noise).clamp_(0.0, 1.0)


def check_jitter(kind_field: str, kind: str, magnitude_field: str, magnitude: float) -> None:
    """``kind`` in JITTER_KINDS; magnitude in [0, 0.5] for hue, [0, 1] otherwise (torchvision ColorJitter)."""
    if kind not in JITTER_KINDS:
        raise ConfigError(kind_field, f"got {kind!r}, must be one of {', '.join(JITTER_KINDS)}")
    check_range(magnitude_field, magnitude, 0.0, 0.5 if kind == "hue" else 1.0)


def _grey(x: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return (factor[:, None, None, None] * x + (1 - factor[:, None, None, None]) * other).clamp_(0.0, 1.0)


def _rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    return torch.stack([hue, sat, maxc], 1)


def _hsv_to_rgb(x: Tensor) -> Tensor:
    h, s, v = x.unbind(1)
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], 1)
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def color_jitter(x: Tensor, kind: str, magnitude: float, generator: torch.Generator | None = None) -> Tensor:
    """One colour shift of torchvision's ColorJitter, with a factor drawn per sample.

    brightness / contrast / saturation: factor uniform in ``[1 - m, 1 + m]`` (brightness scales
    the image, contrast blends with the image's mean grey level, saturation with its grey
    version); hue: shift uniform in ``[-m, m]`` turns of the colour wheel. Saturation and hue
    leave single-channel images unchanged, as torchvision does.
    """
    n = x.shape[0]
    if kind == "hue":
        if x.shape[1] != 3:
            return x.clone()
        hsv = _rgb_to_hsv(x)
        shift = _uniform(n, -magnitude, magnitude, x, generator)
        hsv = torch.stack([(hsv[:, 0] + shift[:, None, None]) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
        return _hsv_to_rgb(hsv).clamp_(0.0, 1.0)
    factor = _uniform(n, max(0.0, 1 - magnitude), 1 + magnitude, x, generator)
    if kind == "brightness":
        return _blend(x, torch.zeros_like(x), factor)
    if kind == "contrast":
        return _blend(x, _grey(x).mean((1, 2, 3), keepdim=True).expand_as(x), factor)
    if kind == "saturation":
        return x.clone() if x.shape[1] == 1 else _blend(x, _grey(x).expand_as(x), factor)
    raise ValueError(f"unknown colour jitter kind {kind!r}")


def down_upsample(x: Tensor, ratio: float) -> Tensor:
    """Resize to ``ratio`` of the size with anti-aliasing (bilinear), then back up (bilinear)."""
    h, w = x.shape[-2:]
    small = TF.resize(x, [max(1, round(h * ratio)), max(1, round(w * ratio))],
                      interpolation=InterpolationMode.BILINEAR, antialias=True)
    return TF.resize(small, [h, w], interpolation=InterpolationMode.BILINEAR, antialias=False).clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------- geometry (analyses)

def translate_wrap(x: Tensor, dy: int, dx: int) -> Tensor:
    """Shift down by ``dy`` and right by ``dx`` pixels; shifted-out pixels re-enter on the other side."""
    return torch.roll(x, shifts=(dy, dx), dims=(-2, -1))


def translate_fill(x: Tensor, dy: int, dx: int) -> Tensor:
    """Shift down by ``dy`` and right by ``dx`` pixels; uncovered pixels become 0."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def check_scale(field: str, factor: float) -> None:
    if not factor > 0:
        raise ConfigError(field, f"got {factor}, a scale factor must be > 0 (0 leaves no image)")


def scale(x: Tensor, factor: float, center: tuple[float, float] | None = None) -> Tensor:
    """Scale by ``factor`` about ``center`` ((x, y); None = image centre) with
    nearest-neighbour sampling; uncovered pixels are black, pixels scaled out of view are cut."""
    return TF.affine(x, angle=0.0, translate=[0, 0], scale=float(factor), shear=[0.0, 0.0],
                     interpolation=InterpolationMode.NEAREST, fill=0.0,
                     center=None if center is None else [float(center[0]), float(center[1])])


def rotate(x: Tensor, degrees: float, center: tuple[float, float] | None = None) -> Tensor:
    """Rotate clockwise by ``degrees`` about ``center`` ((x, y); None = image centre),
    nearest-neighbour, black fill (PIL's ``Image.rotate`` as the "Why is your Trojan" paper uses)."""
    return TF.rotate(x, -float(degrees), interpolation=InterpolationMode.NEAREST, fill=0.0,
                     center=None if center is None else [float(center[0]), float(center[1])])


def circle_offsets(radius: int, points: int = 8) -> list[tuple[int, int]]:
    """``points`` integer offsets (dy, dx) spread evenly on a circle of ``radius`` pixels (rounded)."""
    return [(round(radius * math.sin(2 * math.pi * k / points)), round(radius * math.cos(2 * math.pi * k / points)))
            for k in range(points)]
