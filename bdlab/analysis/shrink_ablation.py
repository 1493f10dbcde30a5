"""ASR and ACC of the trojaned model as the defender's ShrinkPad size grows (ShrinkPad paper, Figs. 12-13)."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from bdlab.analysis.base import Analysis
from bdlab.analysis.common import on_trojan, save_figure, write_table
from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits
from bdlab.errors import ConfigError
from bdlab.services import RunServices
from bdlab.transforms import check_shrink, make_generator, shrink_pad


class ShrinkAblation(Analysis):
    """ShrinkPad-``s`` for every ``s`` in ``sizes`` (ShrinkPad paper, Appendix F.1, Fig. 12; with
    ``attack.enhance_max_shrink`` varied across runs, Fig. 13).

    Writes ``shrink_ablation/shrink_ablation.csv`` (size, asr, acc) and ``.png``; returns
    ``analysis/shrink_ablation/asr_s<size>`` and ``acc_s<size>``.

    Args:
        sizes: shrink sizes (default 0 to 6); each must leave at least one pixel.
        seed: seeds the padding offsets (default: the run's seed).
    """

    name = "shrink_ablation"

    def __init__(self, sizes: list[int] = (0, 1, 2, 3, 4, 5, 6), seed: int = 0) -> None:
        self.sizes, self.seed = [int(s) for s in sizes], seed
        if not self.sizes:
            raise ConfigError("analysis.shrink_ablation.sizes", "give at least one shrink size")

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        if not attack.has_poisoned_test:
            raise ConfigError("analysis.shrink_ablation", "measures an attack's ASR; attack=none (or attack=given "
                              "without attack.trigger) has none")
        for size in self.sizes:
            check_shrink("analysis.shrink_ablation.sizes", size, data.size)

    def run(self, context: RunServices) -> dict[str, Any]:
        rows, metrics = [], {}
        for size in self.sizes:
            generator = make_generator(self.seed, context.device)
            transform = lambda x, s=size: shrink_pad(x, s, generator)  # noqa: E731
            # poisoned inputs first, then clean ones, through the same stream of random offsets
            asr = on_trojan(context, None, context.poisoned_test, transform).asr
            acc = on_trojan(context, context.data.test, None, transform).acc
            rows.append([size, asr, acc])
            metrics[f"analysis/{self.name}/asr_s{size}"] = asr
            metrics[f"analysis/{self.name}/acc_s{size}"] = acc
        write_table(context, self.name, f"{self.name}.csv", ["size", "asr", "acc"], rows)
        figure, axes = plt.subplots(figsize=(4.5, 3.2))
        axes.plot([r[0] for r in rows], [r[1] for r in rows], "o-", label="ASR")
        axes.plot([r[0] for r in rows], [r[2] for r in rows], "s--", color="black", label="ACC")
        axes.set(xlabel="ShrinkPad size (px)", ylabel="%", ylim=(-2, 102),
                 title=f"{context.attack.display_name}: ShrinkPad ablation")
        axes.legend()
        save_figure(context, self.name, f"{self.name}.png", figure)
        return metrics
