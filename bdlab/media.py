"""Pictures of a run for people: the trigger on a few test inputs, saved as PNG next to results.json."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.nn import functional as F
from torchvision.utils import save_image

from bdlab.attacks.base import Attack, NoAttack
from bdlab.datasets.base import ImageSet, to_float

TRIGGER_EXAMPLES = "trigger_examples.png"


def save_trigger_examples(attack: Attack, test: ImageSet, output_dir: Path, count: int = 8) -> dict[str, Path]:
    """Save ``count`` clean test inputs (top row) above their poisoned copies (bottom row).

    Returns ``{"media/trigger_examples": path}`` for the loggers, or nothing without an attack.
    """
    if isinstance(attack, NoAttack):
        return {}
    chosen = (test.labels != attack.target_class).nonzero().flatten()[:count]
    clean = test.images[chosen]
    poisoned = attack.stamp(clean)
    path = output_dir / TRIGGER_EXAMPLES
    # upscaled so 28 px digits are visible in a dashboard
    grid = F.interpolate(to_float(torch.cat([clean, poisoned])), scale_factor=4, mode="nearest")
    save_image(grid, str(path), nrow=len(chosen), padding=4, pad_value=0.5)
    return {"media/trigger_examples": path}
