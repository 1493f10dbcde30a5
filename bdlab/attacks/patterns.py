"""Trigger patterns from image files, converted to the dataset's channel count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from bdlab.errors import ConfigError


def load_pattern(field: str, path: str | Path, channels: int, size: tuple[int, int] | None = None) -> Tensor:
    """Read an image file as float ``(C, H, W)`` in ``[0, 1]``, resized to ``size`` (H, W) if given."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(field, f"pattern file {str(file)!r} does not exist; give an existing image path")
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
