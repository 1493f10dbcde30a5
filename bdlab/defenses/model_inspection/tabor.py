"""TABOR (Guo et al., 2019): Neural Cleanse with regularisers against large, scattered, blocking and
overlaying triggers."""

from __future__ import annotations

from typing import Any

from bdlab.defenses.model_inspection.base import TriggerInversion
from bdlab.inversion.engine import InversionMethod
from bdlab.inversion.methods import TaborTrigger


class Tabor(TriggerInversion):
    """TABOR (Guo, Wang, Xing, Du and Song, "TABOR: A Highly Accurate Approach to Inspecting and Restoring
    Trojan Backdoors in AI Systems", 2019, §4; TrojanZoo "Tabor"): Neural Cleanse's objective and schedule
    plus TABOR's regularisers R1-R4 (:class:`~bdlab.inversion.methods.TaborTrigger`), with TrojanZoo's
    weights (Table 21: 1e-6, 1e-5, 1e-7, 1e-8, 0, 1e-2). Sizes, AIV and flags as Neural Cleanse's.

    Args:
        weights: l1 ... l6 (default [1e-6, 1e-5, 1e-7, 1e-8, 0, 1e-2]).
        epochs, batch_size, lr, threshold, ...: see :class:`~bdlab.defenses.model_inspection.base.TriggerInversion`.
    """

    name = "tabor"

    def __init__(self, weights: list[float] = (1e-6, 1e-5, 1e-7, 1e-8, 0.0, 1e-2), **kwargs: Any) -> None:
        self.weights = [float(w) for w in weights]
        super().__init__(**kwargs)

    def method(self) -> InversionMethod:
        return TaborTrigger(self.weights)

    def method_settings(self) -> dict[str, Any]:
        return {"method": "tabor", "weights": self.weights}
