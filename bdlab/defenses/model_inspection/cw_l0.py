"""Iterative CW-L0 as a trigger-inversion baseline (the Pixel paper's §3.2, App. A)."""

from __future__ import annotations

from typing import Any

from bdlab.defenses.model_inspection.base import TriggerInversion
from bdlab.inversion.engine import InversionMethod
from bdlab.inversion.methods import CWL0Trigger


class CWL0(TriggerInversion):
    """The Pixel paper's CW baseline (§3.2, App. A, Eq. 7-9): per class, CW's margin loss plus a squared
    distance on the pixels a 0/1 mask still allows, pruning the least important allowed pixels after
    every successful epoch (:class:`~bdlab.inversion.methods.CWL0Trigger`). The size is the number of
    allowed pixels.

    Args:
        kappa: CW's confidence margin (default 0).
        prune_fraction: share of the allowed pixels pruned per successful epoch (default 0.1).
        threshold: attack success counted as found (default 0.9).
        epochs, batch_size, lr, ...: see :class:`~bdlab.defenses.model_inspection.base.TriggerInversion`.
    """

    name = "cw_l0"

    def __init__(self, kappa: float = 0.0, prune_fraction: float = 0.1, threshold: float = 0.9,
                 **kwargs: Any) -> None:
        self.kappa, self.prune_fraction = kappa, prune_fraction
        super().__init__(threshold=threshold, **kwargs)

    def method(self) -> InversionMethod:
        return CWL0Trigger(self.kappa, self.prune_fraction)

    def method_settings(self) -> dict[str, Any]:
        return {"method": "cw_l0", "kappa": self.kappa, "prune_fraction": self.prune_fraction}
