"""A targeted universal adversarial perturbation as a trigger-inversion baseline (the Pixel paper's §3.3)."""

from __future__ import annotations

from typing import Any

from bdlab.defenses.model_inspection.base import TriggerInversion
from bdlab.inversion.engine import InversionMethod
from bdlab.inversion.methods import UAPTrigger


class UAP(TriggerInversion):
    """The Pixel paper's UAP baseline (§3.3, App. B, Eq. 10-11): per class, one perturbation bounded by
    ``epsilon`` in L-infinity that sends the held-out images to the class, the per-sample loss capped at
    ``beta`` (:class:`~bdlab.inversion.methods.UAPTrigger`). No size objective: the size is #pixels,
    which is nearly every pixel, so AIV rarely says anything (the paper's point).

    Args:
        epsilon: the L-infinity bound in [0, 1] pixel units (default 0.1).
        beta: the per-sample loss cap (default 10).
        threshold: attack success counted as found (default 0.9).
        epochs, batch_size, lr, ...: see :class:`~bdlab.defenses.model_inspection.base.TriggerInversion`.
    """

    name = "uap"

    def __init__(self, epsilon: float = 0.1, beta: float = 10.0, threshold: float = 0.9, **kwargs: Any) -> None:
        self.epsilon, self.beta = epsilon, beta
        super().__init__(threshold=threshold, **kwargs)

    def method(self) -> InversionMethod:
        return UAPTrigger(self.epsilon, self.beta)

    def method_settings(self) -> dict[str, Any]:
        return {"method": "uap", "epsilon": self.epsilon, "beta": self.beta}
