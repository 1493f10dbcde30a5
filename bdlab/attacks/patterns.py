"""Trigger patterns from image files, converted to the dataset's channel count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from bdlab.compose import CONFIG_DIR
from bdlab.errors import ConfigError


def pattern_path(field: str, path: str | Path) -> Path:
    """``path`` as given (absolute, or relative to the working directory), else relative to bdlab's
    ``conf/`` directory, so configs can name the patterns shipped with them
    (``experiment/checkerboard3.png``) from any working directory."""
    file = Path(path).expanduser()
    if file.is_file():
        return file
    if not file.is_absolute() and (CONFIG_DIR / file).is_file():
        return CONFIG_DIR / file
    raise ConfigError(field, f"pattern file {str(file)!r} does not exist (nor under {CONFIG_DIR}); give an existing "
                      "image path")


def load_pattern(field: str, path: str | Path, channels: int, size: tuple[int, int] | None = None) -> Tensor:
    """Read an image file as float ``(C, H, W)`` in ``[0, 1]``, resized to ``size`` (H, W) if given."""
    file = pattern_path(field, path)
    try:
        image = Image.open(file)
        image = image.convert("L" if channels == 1 else "RGB")
    except Exception as error:
        raise ConfigError(field, f"cannot read {str(file)!r} as an image ({error})") from error
    if size is not None:
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array.copy())
    return tensor[None] if channels == 1 else tensor.permute(2, 0, 1).contiguous()
