"""Pixel (Tao et al., CVPR 2022, the Pixel paper): triggers of as few changed pixels as possible."""

from __future__ import annotations

from typing import Any

from bdlab.defenses.model_inspection.base import TriggerInversion
from bdlab.inversion.engine import InversionMethod
from bdlab.inversion.methods import PixelTrigger


class Pixel(TriggerInversion):
    """The Pixel paper's trigger inversion ("Better Trigger Inversion Optimization in Backdoor Scanning",
    Tao, Shen, Liu, An, Xu, Ma and Zhang, CVPR 2022, §4): per class, a positive and a negative
    perturbation variable and no mask, ``CE + alpha L_pixel`` (Eq. 3-5,
    :class:`~bdlab.inversion.methods.PixelTrigger`), alpha on the same schedule as Neural Cleanse's
    lambda (the paper adjusts it by the attack success). The size is #pixels, the number of pixels the
    trigger changes by at least 1/255 in any channel, and the anomaly index is taken over it.

    ``pairs`` mode (source -> target, every source class to one target) is the engine's with
    ``sources``; the inspection protocol uses the universal mode (all other classes to the target).

    Args:
        gamma: the slope of the regulariser's tanh (default 10); > 0.
        form: ``tanh`` (Eq. 4, default) or ``clip`` (Eq. 6, the simplified form).
        threshold: attack success at which a trigger counts as found (default 0.9, the paper's).
        epochs, batch_size, lr, ...: see :class:`~bdlab.defenses.model_inspection.base.TriggerInversion`.
    """

    name = "pixel"

    def __init__(self, gamma: float = 10.0, form: str = "tanh", threshold: float = 0.9, **kwargs: Any) -> None:
        self.gamma, self.form = gamma, form
        super().__init__(threshold=threshold, **kwargs)

    def method(self) -> InversionMethod:
        return PixelTrigger(self.gamma, self.form)

    def method_settings(self) -> dict[str, Any]:
        return {"method": "pixel", "gamma": self.gamma, "form": self.form}
