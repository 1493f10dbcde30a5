"""K-Arm (Shen et al., ICML 2021): pre-screen the classes, then let a bandit decide whose trigger to optimise next."""

from __future__ import annotations

import random
from typing import Any

from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits
from bdlab.defenses.model_inspection.neural_cleanse import NeuralCleanse
from bdlab.errors import ConfigError, check_at_least, check_range
from bdlab.inversion.engine import ClassState, EpochScheduler, InversionMethod
from bdlab.inversion.methods import NeuralCleanseTrigger, PixelTrigger

#: the trigger K-Arm optimises, and the attack-success threshold each takes by default (its paper's)
OPTIMISATIONS = {"neural_cleanse": 0.99, "pixel": 0.9}


def promise(state: ClassState) -> tuple[bool, float, float]:
    """How likely a class's trigger is the backdoor's: found triggers first, then the smallest, then the
    most successful (a sort key, smaller is more promising)."""
    return (not state.best_reached, state.best_size, -state.best_success)


class KArmScheduler(EpochScheduler):
    """K-Arm's schedule of the engine's epochs (Shen et al., "Backdoor Scanning for Deep Neural Networks
    through K-Arm Optimization", ICML 2021, §3.2-3.3), as bdlab runs it:

    1. pre-screening: the first ``screen_epochs`` epochs optimise every class together; then only the
       ``candidates`` most promising classes (:func:`promise`) stay, the others stop with what they have;
    2. the bandit: each further epoch optimises one arm (class): with probability ``epsilon`` a random
       live candidate (exploration), else the one whose trigger is smallest so far (exploitation).

    A class also leaves when the engine's own early stopping ends it.
    """

    def __init__(self, screen_epochs: int, candidates: int, epsilon: float, seed: int) -> None:
        self.screen_epochs, self.candidates, self.epsilon = screen_epochs, candidates, epsilon
        self.random = random.Random(seed)
        self.screened = False

    def select(self, epoch: int, live: list[int], states: list[ClassState]) -> list[int]:
        if epoch < self.screen_epochs:
            return live
        if not self.screened:
            keep = set(sorted(live, key=lambda k: promise(states[k]))[:self.candidates])
            for k in live:
                states[k].stopped = k not in keep
            live = sorted(keep)
            self.screened = True
        if not live:
            return []
        if self.random.random() < self.epsilon:
            return [self.random.choice(live)]
        return [min(live, key=lambda k: promise(states[k]))]


class KArm(NeuralCleanse):
    """K-Arm on the engine: Neural Cleanse's trigger, loss and schedule, with K-Arm's pre-screening and
    bandit deciding which class each epoch optimises (:class:`KArmScheduler`). The pre-screened-out
    classes keep the triggers of the screening epochs, so AIV is still taken over every class; the
    budget (``epochs``) is shared, and most of it goes to the few candidate classes.

    ``optimisation: pixel`` replaces Neural Cleanse's trigger with Pixel's
    (:class:`~bdlab.inversion.methods.PixelTrigger`, its ``gamma`` and ``form``, threshold 0.9), keeping
    the pre-screening and the bandit: the Pixel paper's K-Arm with its optimisation ("Better Trigger
    Inversion Optimization in Backdoor Scanning", Tao et al., CVPR 2022, §5.5, App. L.2, Table 8 "Ours").
    The size is then #pixels, as Pixel's.

    Args:
        screen_epochs: epochs of pre-screening, every class at once (default 10).
        candidates: classes kept after pre-screening (default 3).
        epsilon: the bandit's exploration probability (default 0.3).
        optimisation: ``neural_cleanse`` (default, K-Arm's) or ``pixel``.
        threshold: attack success at which a trigger counts as found; default null, the optimisation's
            (Neural Cleanse 0.99, Pixel 0.9).
        gamma, form: Pixel's trigger under ``optimisation: pixel`` (defaults 10 and tanh, Eq. 4-5).
        epochs, batch_size, lr, ...: see :class:`~bdlab.defenses.model_inspection.base.TriggerInversion`.
    """

    name = "k_arm"

    def __init__(self, screen_epochs: int = 10, candidates: int = 3, epsilon: float = 0.3,
                 optimisation: str = "neural_cleanse", threshold: float | None = None, gamma: float = 10.0,
                 form: str = "tanh", **kwargs: Any) -> None:
        check_at_least("defense.screen_epochs", screen_epochs, 1)
        check_at_least("defense.candidates", candidates, 1)
        check_range("defense.epsilon", epsilon, 0.0, 1.0)
        if optimisation not in OPTIMISATIONS:
            raise ConfigError("defense.optimisation", f"got {optimisation!r}, must be one of "
                              f"{', '.join(OPTIMISATIONS)}")
        self.screen_epochs, self.candidates, self.epsilon = int(screen_epochs), int(candidates), float(epsilon)
        self.optimisation, self.gamma, self.form = optimisation, gamma, form
        super().__init__(threshold=OPTIMISATIONS[optimisation] if threshold is None else threshold, **kwargs)

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        if self.candidates > data.num_classes:  # more would keep every class: no pre-screening at all
            raise ConfigError("defense.candidates", f"got {self.candidates}, but the dataset has {data.num_classes} "
                              f"classes; at most {data.num_classes}")
        super().setup(data, attack)

    def method(self) -> InversionMethod:
        return PixelTrigger(self.gamma, self.form) if self.optimisation == "pixel" else NeuralCleanseTrigger()

    def scheduler(self) -> KArmScheduler:
        return KArmScheduler(self.screen_epochs, self.candidates, self.epsilon, self.seed)

    def method_settings(self) -> dict[str, Any]:
        settings = {"method": "k_arm", "screen_epochs": self.screen_epochs, "candidates": self.candidates,
                    "epsilon": self.epsilon}
        if self.optimisation != "neural_cleanse":  # only then, so K-Arm's cached inspections keep their key
            settings.update(optimisation=self.optimisation, gamma=self.gamma, form=self.form)
        return settings
