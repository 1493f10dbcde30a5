"""ASR as the trigger's non-zero pixel value goes from 0 to 255 (ShrinkPad paper, section 3.2, Fig. 3)."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import torch

from bdlab.analysis.base import Analysis
from bdlab.analysis.common import evaluation_images, on_trojan, require_trigger, save_figure, stamp_layers, write_table
from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits
from bdlab.errors import ConfigError
from bdlab.services import RunServices


class TriggerAppearance(Analysis):
    """Every non-zero pixel of the trigger pattern (inside its mask) set to ``v``, for ``v`` from 0 to
    255 in steps of ``step``; location and mask unchanged (ShrinkPad paper, Fig. 3).

    Writes ``trigger_appearance/trigger_appearance.csv`` (value, asr) and ``.png``; returns
    ``analysis/trigger_appearance/asr_v<value>`` per value.

    Args:
        step: pixel-value step (default 15: 0, 15, ..., 255; 255 is always included).
        max_images: clean non-target test images stamped per value (default 1000).
    """

    name = "trigger_appearance"

    def __init__(self, step: int = 15, max_images: int = 1000) -> None:
        if not 1 <= step <= 255:
            raise ConfigError("analysis.trigger_appearance.step", f"got {step}, must be in [1, 255]")
        if max_images < 1:
            raise ConfigError("analysis.trigger_appearance.max_images", f"got {max_images}, must be >= 1")
        self.step, self.max_images = int(step), int(max_images)

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        require_trigger(f"analysis.{self.name}", attack)

    def run(self, context: RunServices) -> dict[str, Any]:
        attack = context.attack
        clean, _ = evaluation_images(context, self.max_images)
        mask, pattern = attack.mask, attack.pattern
        inside = (mask > 0) & (pattern > 0)
        values = sorted(set(range(0, 256, self.step)) | {255})
        rows, metrics = [], {}
        for value in values:
            varied = torch.where(inside, torch.full_like(pattern, value / 255), pattern)
            asr = on_trojan(context, None, clean, stamp_layers(mask, varied)).asr
            rows.append([value, asr])
            metrics[f"analysis/{self.name}/asr_v{value}"] = asr
        write_table(context, self.name, f"{self.name}.csv", ["value", "asr"], rows)
        figure, axes = plt.subplots(figsize=(4.5, 3.2))
        axes.plot(values, [r[1] for r in rows], "o-")
        original = pattern[inside]
        if len(original):
            axes.axvline(round(original.max().item() * 255), color="red", linestyle=":", label="training value")
            axes.legend()
        axes.set(xlabel="non-zero trigger pixel value", ylabel="ASR (%)", ylim=(-2, 102),
                 title=f"{attack.display_name}: trigger appearance")
        save_figure(context, self.name, f"{self.name}.png", figure)
        return metrics
