"""Pictures of a run for people, saved as PNG next to results.json: the trigger on a few test inputs,
and a few poisoned training images next to their originals; where the dataset names its classes, each
tile is captioned with its class."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torch.nn import functional as F
from torchvision.transforms.v2.functional import to_pil_image
from torchvision.utils import make_grid

from bdlab.attacks.base import Attack, PoisonedSet
from bdlab.datasets.base import ImageSet, to_float, to_uint8

TRIGGER_EXAMPLES = "trigger_examples.png"
POISONED_EXAMPLES = "poisoned_examples.png"


def _fitted(text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text``, shortened with dots until it fits ``width`` pixels (ASCII: the default font draws little else)."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def save_grid(images: Tensor, path: Path, nrow: int, padding: int = 4, captions: Sequence[str] | None = None) -> Path:
    """Save float ``[0, 1]`` images as a PNG grid of ``nrow`` columns on grey. ``captions`` (one per image,
    "" for none) go in a white band under each tile, in every row that has one."""
    picture = to_pil_image(to_uint8(make_grid(images, nrow=nrow, padding=padding, pad_value=0.5)))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not captions or not any(captions):
        picture.save(path)
        return path
    font = ImageFont.load_default()
    band = font.getbbox("Ag")[3] + 4
    (height, width), columns = images.shape[-2:], min(nrow, len(images))
    rows, step = math.ceil(len(images) / columns), height + padding
    bands = [band if any(captions[r * columns:(r + 1) * columns]) else 0 for r in range(rows)]
    # the top-left pixel is the padding's grey, whatever the image mode
    canvas = Image.new(picture.mode, (picture.width, picture.height + sum(bands)), picture.getpixel((0, 0)))
    draw, top = ImageDraw.Draw(canvas), 0
    for r in range(rows):  # each row (its top padding and tiles), then its caption band
        canvas.paste(picture.crop((0, r * step, picture.width, (r + 1) * step)), (0, top))
        top += step
        for c, caption in enumerate(captions[r * columns:(r + 1) * columns] if bands[r] else []):
            left = padding + c * (width + padding)
            draw.rectangle((left, top, left + width - 1, top + band - 1), fill="white")
            draw.text((left + 2, top + 2), _fitted(caption, font, width - 4), fill="black", font=font)
        top += bands[r]
    canvas.paste(picture.crop((0, rows * step, picture.width, picture.height)), (0, top))
    canvas.save(path)
    return path


def _save_pairs(originals: Tensor, changed: Tensor, path: Path, captions: Sequence[str] | None) -> None:
    # upscaled so 28 px digits are visible in a dashboard
    grid = F.interpolate(to_float(torch.cat([originals, changed])), scale_factor=4, mode="nearest")
    save_grid(grid, path, len(originals), captions=captions)


def save_trigger_examples(attack: Attack, test: ImageSet, output_dir: Path, count: int = 8,
                          class_names: Sequence[str] | None = None) -> dict[str, Path]:
    """Save ``count`` clean test inputs (top row) above their poisoned copies (bottom row); with
    ``class_names``, each clean input is captioned with its class and each copy with the target's.

    Returns ``{"media/trigger_examples": path}`` for the loggers, or nothing without an attack.
    """
    if not attack.has_poisoned_test:  # no attack, or a given model whose trigger was not named
        return {}
    chosen = (test.labels != attack.target_class).nonzero().flatten()[:count]
    clean = test.images[chosen]
    poisoned = attack.stamp(clean)
    path = output_dir / TRIGGER_EXAMPLES
    captions = None if class_names is None else \
        [class_names[int(y)] for y in test.labels[chosen]] + [f"-> {class_names[attack.target_class]}"] * len(chosen)
    _save_pairs(clean, poisoned, path, captions)
    return {"media/trigger_examples": path}


def save_poisoned_examples(train: ImageSet, poisoned: PoisonedSet | None, output_dir: Path,
                           count: int = 8, class_names: Sequence[str] | None = None) -> dict[str, Path]:
    """Save the first ``count`` poisoned training images (bottom row) under their originals (top row),
    captioned, with ``class_names``, by their label before and after poisoning.

    What the trojaned model was trained on: for clean-label attacks (label-consistent, Refool
    with ``clean_label``) it shows whether the poisons still look like their label. Returns
    ``{"media/poisoned_examples": path}``, or nothing when no sample was poisoned.
    """
    if poisoned is None or not poisoned.is_poison.any():
        return {}
    chosen = poisoned.is_poison.nonzero().flatten()[:count]
    path = output_dir / POISONED_EXAMPLES
    captions = None if class_names is None else \
        [class_names[int(y)] for y in torch.cat([train.labels[chosen], poisoned.labels[chosen]])]
    _save_pairs(train.images[chosen], poisoned.images[chosen], path, captions)
    return {"media/poisoned_examples": path}
