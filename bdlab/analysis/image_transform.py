"""The whole poisoned image translated, scaled and rotated ("Why is your Trojan NOT responding?",
section 4.2 and 5.3, Fig. 4, Table 3)."""

from __future__ import annotations

from typing import Any

from bdlab.analysis.common import error_rate, evaluation_images, on_trojan
from bdlab.analysis.transform_study import TransformStudy, run_study
from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits
from bdlab.errors import ConfigError
from bdlab.services import RunServices
from bdlab.transforms import rotate, scale, translate_wrap


class ImageTransform(TransformStudy):
    """Poisoned test images (and the same clean images) translated with wrap-around (shifted-out
    pixels re-enter on the other side), scaled about the centre (nearest-neighbour, black fill)
    and rotated clockwise about the centre (nearest, black fill), as in Fig. 4.

    Per configuration: ``asr`` on the transformed poisoned images, ``acc`` on the transformed
    clean images, ``asr_drop`` = ASR_1 - ASR_2 (untransformed minus transformed, on the same
    images) and ``error_rate`` (Table 3: neither target nor true label, among samples whose
    clean version is right and whose untransformed poisoned version hits the target).
    Writes ``image_transform/image_transform.csv`` and a three-panel ``.png``; returns the
    per-parameter means as ``analysis/image_transform/<transform>_<parameter>/<column>``.

    Args:
        radii: translation radii in pixels (default 1, 2, 3).
        points: positions per circle (default 8, at least 8).
        scales: scale factors (default 0.8, 0.9, 1.0, 1.1, 1.2).
        angles: rotation angles in degrees (default 0 to 90 in 15-degree steps).
        max_images: non-target test images (default 1000, the paper's).
    """

    name = "image_transform"

    def __init__(self, radii: list[int] = (1, 2, 3), points: int = 8, scales: list[float] = (0.8, 0.9, 1.0, 1.1, 1.2),
                 angles: list[float] = (0, 15, 30, 45, 60, 75, 90), max_images: int = 1000) -> None:
        super().__init__(radii, points, scales, angles, max_images)

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        field = f"analysis.{self.name}"
        if not attack.has_poisoned_test:
            raise ConfigError(field, "measures an attack's ASR; attack=none (or attack=given without attack.trigger) "
                              "has none")
        for factor in self.scales:
            if round(min(data.size) * factor) < 1:
                raise ConfigError(f"{field}.scales", f"{factor} shrinks the {data.size} image to nothing")

    def run(self, context: RunServices) -> dict[str, Any]:
        target = context.attack.target_class
        clean, poisoned = evaluation_images(context, self.max_images)
        before = on_trojan(context, clean, poisoned)
        clean_pred, poisoned_pred = before.clean_logits.argmax(1), before.poisoned_logits.argmax(1)

        def measure(kind, parameter, transform, point) -> list[float]:
            after = on_trojan(context, clean, poisoned, transform)
            errors = error_rate(after.poisoned_logits.argmax(1), clean_pred, poisoned_pred, poisoned.labels, target)
            return [after.asr, after.acc, before.asr - after.asr, errors]

        return run_study(context, self.name, self.radii, self.points, self.scales, self.angles,
                         ["asr", "acc", "asr_drop", "error_rate"], measure,
                         translate=lambda dy, dx: lambda x: translate_wrap(x, dy, dx),
                         scale=lambda f: lambda x: scale(x, f),
                         rotate=lambda a: lambda x: rotate(x, a))
