"""Pictures of a run for people, saved as PNG next to results.json: the trigger on a few test inputs,
and a few poisoned training images next to their originals."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.utils import save_image

from bdlab.attacks.base import Attack, NoAttack, PoisonedSet
from bdlab.datasets.base import ImageSet, to_float

TRIGGER_EXAMPLES = "trigger_examples.png"
POISONED_EXAMPLES = "poisoned_examples.png"


def _save_pairs(originals: Tensor, changed: Tensor, path: Path) -> None:
    # upscaled so 28 px digits are visible in a dashboard
    grid = F.interpolate(to_float(torch.cat([originals, changed])), scale_factor=4, mode="nearest")
    save_image(grid, str(path), nrow=len(originals), padding=4, pad_value=0.5)


def save_trigger_examples(attack: Attack, test: ImageSet, output_dir: Path, count: int = 8) -> dict[str, Path]:
    """Save ``count`` clean test inputs (top row) above their poisoned copies (bottom row).

    Returns ``{"media/trigger_examples": path}`` for the loggers, or nothing without an attack.
    """
    if not attack.has_poisoned_test:  # no attack, or a given model whose trigger was not named
        return {}
    chosen = (test.labels != attack.target_class).nonzero().flatten()[:count]
    clean = test.images[chosen]
    poisoned = attack.stamp(clean)
    path = output_dir / TRIGGER_EXAMPLES
    _save_pairs(clean, poisoned, path)
    return {"media/trigger_examples": path}


def save_poisoned_examples(train: ImageSet, poisoned: PoisonedSet | None, output_dir: Path,
                           count: int = 8) -> dict[str, Path]:
    """Save the first ``count`` poisoned training images (bottom row) under their originals (top row).

    What the trojaned model was trained on: for clean-label attacks (label-consistent, Refool
    with ``clean_label``) it shows whether the poisons still look like their label. Returns
    ``{"media/poisoned_examples": path}``, or nothing when no sample was poisoned.
    """
    if poisoned is None or not poisoned.is_poison.any():
        return {}
    chosen = poisoned.is_poison.nonzero().flatten()[:count]
    path = output_dir / POISONED_EXAMPLES
    _save_pairs(train.images[chosen], poisoned.images[chosen], path)
    return {"media/poisoned_examples": path}
