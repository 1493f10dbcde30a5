"""Pixel (Tao et al., CVPR 2022, the Pixel paper): triggers of as few changed pixels as possible."""

from __future__ import annotations

from typing import Any

from bdlab.defenses.model_inspection.base import TriggerInversion
from bdlab.errors import ConfigError, check_at_least
from bdlab.inversion.engine import InversionMethod
from bdlab.inversion.methods import PixelTrigger
from bdlab.inversion.released import (RELEASE_FORM, RELEASE_IMAGES, RELEASE_PATIENCE, RELEASE_STEPS,
                                      ReleasedPixelEngine)

SCHEDULES = ("engine", "released")


class Pixel(TriggerInversion):
    """The Pixel paper's trigger inversion ("Better Trigger Inversion Optimization in Backdoor Scanning",
    Tao, Shen, Liu, An, Xu, Ma and Zhang, CVPR 2022, §4): per class, a positive and a negative
    perturbation variable and no mask, ``CE + alpha L_pixel`` (Eq. 3-5,
    :class:`~bdlab.inversion.methods.PixelTrigger`), alpha on the same schedule as Neural Cleanse's
    lambda (the paper adjusts it by the attack success). The size is #pixels, the number of pixels the
    trigger changes by at least 1/255 in any channel, and the anomaly index is taken over it.

    ``schedule: engine`` (default) runs it on bdlab's engine (epochs, early stopping, the smallest
    successful trigger); ``schedule: released`` on the authors' released code's procedure
    (:class:`~bdlab.inversion.released.ReleasedPixelEngine`: U[0, 1) start, ``steps`` single-batch
    steps, a new best only when the regulariser and #pixels both shrink, a reset to it). Where
    ``form``, ``patience`` or ``optimisation_images`` are not given (null), each schedule has its own:
    engine tanh, 5 epochs, 300 images; released clip, 10 steps, 50 images. Under ``released``,
    ``epochs``, ``early_stop_patience``, ``mode`` and ``restarts`` do not apply.

    ``pairs`` mode (source -> target, every source class to one target) is the engine's with
    ``sources``; the inspection protocol uses the universal mode (all other classes to the target).

    Args:
        gamma: the slope of the regulariser's tanh (default 10); > 0.
        form: ``tanh`` (Eq. 4) or ``clip`` (Eq. 6, the simplified form); default null, the schedule's.
        threshold: attack success at which a trigger counts as found (default 0.9, the paper's).
        schedule: ``engine`` (default) or ``released``.
        steps: the released schedule's optimiser steps (default 1000, the release's); >= 1.
        patience: alpha's patience, in epochs (engine) or steps (released); default null, the schedule's.
        optimisation_images: held-out images the triggers are optimised on; default null, the schedule's.
        epochs, batch_size, lr, ...: see :class:`~bdlab.defenses.model_inspection.base.TriggerInversion`.
    """

    name = "pixel"

    def __init__(self, gamma: float = 10.0, form: str | None = None, threshold: float = 0.9,
                 schedule: str = "engine", steps: int = RELEASE_STEPS, patience: int | None = None,
                 optimisation_images: int | None = None, **kwargs: Any) -> None:
        if schedule not in SCHEDULES:
            raise ConfigError("defense.schedule", f"got {schedule!r}, must be one of {', '.join(SCHEDULES)}")
        check_at_least("defense.steps", steps, 1)
        released = schedule == "released"
        if released and kwargs.get("mode", "batched") != "batched":
            raise ConfigError("defense.mode", "the released schedule runs every class in one batch; leave mode at "
                              "batched, or use defense.schedule=engine")
        if released and kwargs.get("restarts", 1) != 1:
            raise ConfigError("defense.restarts", "the released schedule starts each class once; leave restarts at "
                              "1, or use defense.schedule=engine")
        # a field left null takes its schedule's default: the release's, or TriggerInversion's and PixelTrigger's own
        for key, value, release_default in (("patience", patience, RELEASE_PATIENCE),
                                            ("optimisation_images", optimisation_images, RELEASE_IMAGES)):
            if value is not None or released:
                kwargs[key] = release_default if value is None else value
        self.gamma, self.schedule = gamma, schedule
        self.form = form if form is not None else RELEASE_FORM if released else PixelTrigger().form
        super().__init__(threshold=threshold, **kwargs)
        if released:
            engine = self.engine  # the one TriggerInversion built, whose checks the shared values passed
            self.engine = ReleasedPixelEngine(engine.method, steps, engine.batch_size, engine.lr, engine.threshold,
                                              engine.schedule, self.seed)
            alpha = engine.schedule
            # the release's procedure has no epochs, early stop, mode or restarts: they leave its cache key
            self.engine_settings = {"schedule": "released", "steps": int(steps), "batch_size": engine.batch_size,
                                    "lr": engine.lr, "threshold": engine.threshold,
                                    "alpha": [alpha.init, alpha.up, alpha.down, alpha.patience]}

    def method(self) -> InversionMethod:
        return PixelTrigger(self.gamma, self.form)

    def method_settings(self) -> dict[str, Any]:
        return {"method": "pixel", "gamma": self.gamma, "form": self.form}
