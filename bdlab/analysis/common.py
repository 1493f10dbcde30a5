"""What the trigger-robustness analyses share: evaluation subsets, trigger layers, file output, W&B logging."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
from pytorch_lightning.loggers import WandbLogger  # noqa: E402
from torch import Tensor  # noqa: E402

from bdlab.attacks.base import Attack, MaskPatternAttack, blend  # noqa: E402
from bdlab.datasets.base import ImageSet  # noqa: E402
from bdlab.errors import ConfigError  # noqa: E402
from bdlab.evaluate import Evaluation, Transform, evaluate  # noqa: E402
from bdlab.metrics import percent
from bdlab.services import RunServices  # noqa: E402


def require_trigger(field: str, attack: Attack, local: bool = False) -> None:
    """Refuse attacks without a mask-and-pattern trigger (``local``: one that leaves some pixels untouched)."""
    if not isinstance(attack, MaskPatternAttack) or attack.trigger_mask is None:
        raise ConfigError(field, f"transforms the trigger alone, which needs one fixed mask-and-pattern trigger "
                          f"(badnets, blended, uat, ...); attack {attack.display_name!r} has none (a sample-specific "
                          "or randomly placed trigger): use analysis=image_transform")
    if local and bool(attack.trigger_mask.all()):
        raise ConfigError(field, f"needs a local trigger; attack {attack.display_name!r} covers the whole image")


def evaluation_images(context: RunServices, max_images: int) -> tuple[ImageSet, ImageSet]:
    """The first ``max_images`` clean non-target test images and their poisoned copies (true labels)."""
    keep = (context.data.test.labels != context.attack.target_class).nonzero().flatten()[:max_images]
    clean = context.data.test.subset(keep)
    poisoned = ImageSet(context.poisoned_test.images[:len(keep)], context.poisoned_test.labels[:len(keep)])
    return clean, poisoned


def stamp_layers(mask: Tensor, pattern: Tensor) -> Transform:
    """The attack's own stamping (:func:`~bdlab.attacks.base.blend`) with a (possibly transformed)
    trigger mask ``(1, H, W)`` and pattern ``(C, H, W)``."""
    return lambda x: blend(x, mask, pattern)


def trigger_centre(mask: Tensor) -> tuple[float, float]:
    """``(x, y)`` centre of the mask's bounding box, in the convention of :mod:`bdlab.transforms`."""
    rows, cols = (mask[0] > 0).nonzero().unbind(1)
    return ((cols.min() + cols.max() + 1).item() / 2, (rows.min() + rows.max() + 1).item() / 2)


def on_trojan(context: RunServices, clean: ImageSet | None, triggered: ImageSet | None,
              transform: Transform | None = None) -> Evaluation:
    """The evaluator on the trojaned model: ACC of ``clean`` and ASR of ``triggered`` inputs, each
    through ``transform``; the logits give the predictions the error rates need."""
    return evaluate(context.trojan_model(), clean, triggered, context.attack.target_class, transform)


def error_rate(transformed: Tensor, clean: Tensor, poisoned: Tensor, labels: Tensor, target: int) -> float:
    """"Why is your Trojan" Table 3: share of transformed poisoned inputs predicted neither as the
    target nor as the true label, among those whose clean version is right and whose
    untransformed poisoned version hits the target."""
    valid = (clean == labels) & (poisoned == target)
    wrong = (transformed != target) & (transformed != labels)
    return percent(wrong[valid])


def output_dir(context: RunServices, name: str) -> Path:
    path = context.output_dir / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_table(context: RunServices, name: str, file: str, columns: Sequence[str], rows: list[list[Any]]) -> Path:
    """Write a CSV under the analysis folder and log it as a W&B table where a W&B logger runs."""
    path = output_dir(context, name) / file
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(columns)
        writer.writerows(rows)
    for logger in context.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=f"analysis/{name}/{path.stem}", columns=list(columns), data=rows)
    return path


def save_figure(context: RunServices, name: str, file: str, figure: plt.Figure) -> Path:
    """Save a PNG under the analysis folder and log it as a W&B image where a W&B logger runs."""
    path = output_dir(context, name) / file
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    for logger in context.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=f"analysis/{name}/{path.stem}", images=[str(path)])
    return path


def check_positive_int(field: str, value: int) -> None:
    if value < 1:
        raise ConfigError(field, f"got {value}, must be >= 1")
