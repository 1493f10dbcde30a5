"""The trigger alone translated, scaled and rotated on clean images ("Why is your Trojan NOT
responding?", section 4.2 and 5.2, Fig. 3; error rates as in Table 3)."""

from __future__ import annotations

from typing import Any

from bdlab.analysis.common import (
    error_rate,
    evaluation_images,
    on_trojan,
    require_trigger,
    stamp_layers,
    trigger_centre,
)
from bdlab.analysis.transform_study import TransformStudy, run_study
from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits
from bdlab.errors import ConfigError
from bdlab.services import RunServices
from bdlab.transforms import rotate, scale, translate_fill


class TriggerTransform(TransformStudy):
    """The trigger layer (mask and pattern) moved to ``points`` positions on circles of each radius,
    scaled about its centre, and rotated clockwise about its centre, nearest-neighbour, then
    stamped on clean non-target test images (Fig. 3 of "Why is your Trojan").

    Writes ``trigger_transform/trigger_transform.csv`` (transform, parameter, dy, dx, asr,
    error_rate) and a three-panel ``.png``; returns the per-parameter mean ASR and error rate as
    ``analysis/trigger_transform/<transform>_<parameter>/{asr,error_rate}``. The error rate
    (Table 3) counts predictions that are neither the target nor the true label.

    Args:
        radii: translation radii in pixels (default 1, 2, 3).
        points: positions per circle (default 8, at least 8).
        scales: scale factors (default 0.8, 1.0, 1.2).
        angles: rotation angles in degrees (default 0 to 90 in 15-degree steps).
        max_images: clean non-target test images (default 1000, the paper's).
    """

    name = "trigger_transform"

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        field = f"analysis.{self.name}"
        require_trigger(field, attack)
        mask = attack.mask
        centre = trigger_centre(mask)
        for factor in self.scales:
            if scale(mask[None], factor, centre).sum() == 0:
                raise ConfigError(f"{field}.scales", f"{factor} shrinks the trigger to nothing; use a larger factor")
        for radius in self.radii:
            if radius >= min(data.size):
                raise ConfigError(f"{field}.radii", f"{radius} moves the trigger off the {data.size} image")

    def run(self, context: RunServices) -> dict[str, Any]:
        attack = context.attack
        target = attack.target_class
        clean, _ = evaluation_images(context, self.max_images)
        mask, pattern = attack.mask, attack.pattern
        centre = trigger_centre(mask)
        clean_pred = on_trojan(context, clean, None).clean_logits.argmax(1)
        poisoned_pred = on_trojan(context, None, clean, stamp_layers(mask, pattern)).poisoned_logits.argmax(1)

        def layers(op):
            return stamp_layers(op(mask[None])[0], op(pattern[None])[0])

        def measure(kind, parameter, stamp, point) -> list[float]:
            outcome = on_trojan(context, None, clean, stamp)
            predicted = outcome.poisoned_logits.argmax(1)
            return [outcome.asr, error_rate(predicted, clean_pred, poisoned_pred, clean.labels, target)]

        return run_study(context, self.name, self.radii, self.points, self.scales, self.angles,
                         ["asr", "error_rate"], measure,
                         translate=lambda dy, dx: layers(lambda t: translate_fill(t, dy, dx)),
                         scale=lambda f: layers(lambda t: scale(t, f, centre)),
                         rotate=lambda a: layers(lambda t: rotate(t, a, centre)))

