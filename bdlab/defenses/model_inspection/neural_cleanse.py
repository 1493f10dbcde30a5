"""Neural Cleanse (Wang et al., S&P 2019): the smallest mask-and-pattern trigger per class; an outlier is a backdoor."""

from __future__ import annotations

from typing import Any

from bdlab.defenses.model_inspection.base import TriggerInversion
from bdlab.inversion.engine import InversionMethod
from bdlab.inversion.methods import NeuralCleanseTrigger


class NeuralCleanse(TriggerInversion):
    """Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in Neural
    Networks", S&P 2019, §4; TrojanZoo "Nc"): for every class, the mask ``m`` and pattern ``p`` minimising
    ``CE(f((1 - m) x + m p), k) + lambda |m|_1`` (Eq. 3) on held-out clean images, all classes in one
    batch on the engine; lambda on the released code's schedule (start 1e-3, x1.5 after 5 epochs at an
    attack success >= 0.99, /1.5^1.5 after 5 below; early stop 25 epochs after both). The size is the
    mask's L1 norm; a class whose norm is an outlier on the small side (anomaly index > 2, MAD x 1.4826)
    is flagged. Adam, step 0.1, betas (0.5, 0.9), batches of 32.

    Args: see :class:`~bdlab.defenses.model_inspection.base.TriggerInversion`.
    """

    name = "neural_cleanse"

    def method(self) -> InversionMethod:
        return NeuralCleanseTrigger()

    def method_settings(self) -> dict[str, Any]:
        return {"method": "nc"}
