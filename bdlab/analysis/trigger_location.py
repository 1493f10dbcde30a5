"""ASR with the trigger moved to every position of the image (ShrinkPad paper, section 3.2, Fig. 2)."""

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
from bdlab.transforms import translate_fill


class TriggerLocation(Analysis):
    """The trigger (mask and pattern, appearance unchanged) shifted so that its minimum covering
    box's bottom-right pixel visits every pixel where the box fits (ShrinkPad paper, Definition 2, Fig. 2).

    Writes ``trigger_location/trigger_location.csv`` (row, col of the box's bottom-right pixel,
    asr) and a heatmap ``.png``; returns ``asr_original`` (the training position), ``asr_mean``
    and ``asr_min`` under ``analysis/trigger_location/``.

    Args:
        stride: step between visited positions in pixels (default 1).
        max_images: clean non-target test images stamped per position (default 200).
    """

    name = "trigger_location"

    def __init__(self, stride: int = 1, max_images: int = 200) -> None:
        if stride < 1:
            raise ConfigError("analysis.trigger_location.stride", f"got {stride}, must be >= 1")
        if max_images < 1:
            raise ConfigError("analysis.trigger_location.max_images", f"got {max_images}, must be >= 1")
        self.stride, self.max_images = int(stride), int(max_images)

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        require_trigger(f"analysis.{self.name}", attack, local=True)

    def run(self, context: RunServices) -> dict[str, Any]:
        attack = context.attack
        clean, _ = evaluation_images(context, self.max_images)
        mask, pattern = attack.mask, attack.pattern
        rows_in, cols_in = (mask[0] > 0).nonzero().unbind(1)
        bottom, right = rows_in.max().item(), cols_in.max().item()
        height, width = mask.shape[1:]
        box_h, box_w = bottom - rows_in.min().item() + 1, right - cols_in.min().item() + 1
        heat = torch.full((height, width), float("nan"))
        table = []
        for row in range(box_h - 1, height, self.stride):
            for col in range(box_w - 1, width, self.stride):
                dy, dx = row - bottom, col - right
                stamp = stamp_layers(translate_fill(mask, dy, dx), translate_fill(pattern, dy, dx))
                asr = on_trojan(context, None, clean, stamp).asr
                heat[row, col] = asr
                table.append([row, col, asr])
        write_table(context, self.name, f"{self.name}.csv", ["row", "col", "asr"], table)
        figure, axes = plt.subplots(figsize=(4.5, 4))
        image = axes.imshow(heat.numpy(), vmin=0, vmax=100, cmap="viridis")
        axes.plot([right], [bottom], "rs", markersize=4, label="training position")
        axes.set(title=f"{attack.display_name}: ASR by trigger location", xlabel="column", ylabel="row")
        axes.legend(loc="upper left", fontsize=7)
        figure.colorbar(image, ax=axes, label="ASR (%)")
        save_figure(context, self.name, f"{self.name}.png", figure)
        values = torch.tensor([r[2] for r in table])
        original = heat[bottom, right].item()
        return {f"analysis/{self.name}/asr_original": original,
                f"analysis/{self.name}/asr_mean": values.mean().item(),
                f"analysis/{self.name}/asr_min": values.min().item()}
