"""The style domain DFST's CycleGAN learns to translate into: a folder of images, or, offline, a procedural
"sunrise" look applied to the dataset's own images.

DFST (Cheng et al., AAAI 2021) trains its CycleGAN towards a style such as "sunrise" (a photo collection);
"Why is your Trojan NOT responding?" §5.1 uses Cezanne's paintings. Neither collection ships with bdlab, so
without ``attack.style_root`` the style images are made by :func:`sunrise`, and runs say so
(``attack/procedural_style`` = 1 in results.json, and a log line).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from bdlab.cache import file_digest
from bdlab.datasets.base import to_float, to_uint8
from bdlab.datasets.image_folder import decode, image_files
from bdlab.errors import ConfigError

FIELD = "attack.style_root"
#: the sunrise look: per-channel gain and lift of RGB (warmer reds, weaker blues)
SUNRISE_GAIN = (1.15, 0.95, 0.70)
SUNRISE_LIFT = (0.10, 0.04, 0.00)
#: how much the corners darken (the vignette), and the std of the luminance grain
SUNRISE_VIGNETTE = 0.35
SUNRISE_GRAIN = 0.04
#: ITU-R BT.601 luma weights, to collapse the tint for one-channel images
LUMA = (0.299, 0.587, 0.114)


def sunrise(images: Tensor, seed: int) -> Tensor:
    """The procedural stand-in style of uint8 ``images`` ``(N, C, H, W)``: a warm tint (RGB gains
    :data:`SUNRISE_GAIN` and lifts :data:`SUNRISE_LIFT`; one-channel images get their luma-weighted
    mean), a radial vignette darkening the corners by :data:`SUNRISE_VIGNETTE`, and Gaussian luminance grain
    of std :data:`SUNRISE_GRAIN` drawn from a generator seeded by ``seed`` (same seed, same images). uint8 out."""
    x = to_float(images.cpu())
    count, channels, height, width = x.shape
    gain, lift = torch.tensor(SUNRISE_GAIN), torch.tensor(SUNRISE_LIFT)
    if channels != 3:
        luma = torch.tensor(LUMA)
        gain, lift = (luma * gain).sum().expand(channels), (luma * lift).sum().expand(channels)
    x = x * gain.view(1, -1, 1, 1) + lift.view(1, -1, 1, 1)
    ys = torch.linspace(-1.0, 1.0, height).view(-1, 1)
    xs = torch.linspace(-1.0, 1.0, width).view(1, -1)
    x = x * (1.0 - SUNRISE_VIGNETTE * (ys ** 2 + xs ** 2) / 2)
    grain = torch.randn(count, 1, height, width, generator=torch.Generator().manual_seed(seed))
    return to_uint8(x + SUNRISE_GRAIN * grain)


def style_folder_digest(root: str | Path) -> str | None:
    """A digest of the style images under ``root`` (their paths relative to it and their bytes), so that a
    model's cache key follows the folder's content, not its place; None where ``root`` is not a folder (the
    loader refuses it in one line)."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in image_files(folder):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_digest(path)}\0".encode())
    return digest.hexdigest()


def load_style_folder(root: str | Path, channels: int, size: tuple[int, int]) -> Tensor:
    """Every image under ``root`` (at any depth, hidden files skipped, as ``dataset=image_folder`` finds them),
    decoded the same way (:func:`bdlab.datasets.image_folder.decode`: alpha dropped, converted to ``channels``,
    resized to ``size``), as uint8 ``(N, C, H, W)``; one ConfigError line on ``attack.style_root`` for a
    missing folder, a folder without images, or a file that does not decode."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise ConfigError(FIELD, f"{str(folder)!r} is not a directory; give a folder of style images or null for "
                          "the procedural stand-in")
    files = image_files(folder)
    if not files:
        raise ConfigError(FIELD, f"{str(folder)!r} holds no image files; add style images (png, jpg, ...) or set "
                          "it to null for the procedural stand-in")
    images = torch.empty(len(files), channels, *size, dtype=torch.uint8)
    for i, path in enumerate(files):
        try:
            images[i] = decode(path, channels, size)
        except Exception as error:  # PIL and its decoders raise many types for a file that is not an image
            raise ConfigError(FIELD, f"cannot read {str(path)!r} as an image ({type(error).__name__}); replace or "
                              "remove it") from None
    return images
