"""A given model as the subject of a run: nothing is poisoned or trained (``attack=given model.weights=...``)."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits, ImageSet
from bdlab.errors import ConfigError, build
from bdlab.plugins import group_options, load_option
from bdlab.services import RunServices


class GivenModel(Attack):
    """The model under test is one the user was given (TrojAI's, K-Arm's and the Pixel paper's setting:
    scanning models one did not train). Its weights come from ``model.weights``; no training set exists.

    What the user knows is optional, and every metric that needs what was not given is reported as not
    applicable (NaN, ``n/a`` in tables), never computed on something else:

    Args:
        target_class: the class the backdoor is known or suspected to target (default null: "target
            flagged", the target's AIV and ASR are n/a).
        trigger: a bdlab attack option whose trigger stamps the test inputs (``badnets``, ``blended``,
            ``badnets_checkerboard``, ...; default null: no triggered inputs, so ASR, TPR and NSR are n/a).
            Only triggers fixed by their settings qualify; one an attack learns while training does not.
        trigger_args: that option's fields to change (``{patch_size: 4, position: top_left}``; default none).
        clean_weights: a clean reference model of the same architecture (default null: the clean model's
            figures, such as CAD and the clean model's largest AIV, are n/a).
    """

    name = "given"
    trains = False

    def __init__(self, target_class: int | None = None, trigger: str | None = None,
                 trigger_args: Mapping[str, Any] = MappingProxyType({}), clean_weights: str | None = None, seed: int = 0) -> None:
        super().__init__(poison_rate=1.0, target_class=-1 if target_class is None else target_class, seed=seed)
        self.known_target = target_class is not None
        self.trigger, self.clean_weights = trigger, clean_weights
        self.trigger_args = dict(trigger_args)
        if self.trigger is None and self.trigger_args:
            raise ConfigError("attack.trigger_args", "set without attack.trigger; name the trigger they change")
        if self.trigger is not None and not self.known_target:
            raise ConfigError("attack.target_class", f"the trigger {trigger!r} is named but not its target; "
                              "give attack.target_class=<class>")
        self.stamper: Attack | None = self._stamper() if self.trigger is not None else None

    def _stamper(self) -> Attack:
        node = load_option("attack", str(self.trigger)) if self.trigger not in ("given", "none") else None
        if node is None:
            options = [o for o in group_options("attack") or [] if o not in ("given", "none")]
            raise ConfigError("attack.trigger", f"no attack option {self.trigger!r}; name one of {', '.join(options)}")
        node = OmegaConf.merge(node, self.trigger_args, {"target_class": self.target_class, "seed": self.seed})
        node.pop("defaults", None)
        return build(node, path="attack.trigger_args")

    @classmethod
    def around(cls, attack: Attack) -> GivenModel:
        """A given model whose trigger is ``attack``'s, as it stands (set up, and with what it learned when
        bdlab trained the model): how the Python API measures a model against a known attack."""
        attack.require_setup()
        given = cls(target_class=attack.target_class, seed=attack.seed)
        given.trigger, given.stamper = attack.name, attack
        return given

    @property
    def has_poisoned_test(self) -> bool:
        """Triggered test inputs exist only when the trigger is named."""
        return self.stamper is not None

    def setup(self, data: DatasetSplits, resources: RunServices | None = None) -> None:
        """Check the target against the dataset and build the named trigger; refuses one that is learned."""
        self._resources = resources
        if self.known_target and not 0 <= self.target_class < data.num_classes:
            raise ConfigError("attack.target_class", f"got {self.target_class}, must be in "
                              f"[0, {data.num_classes - 1}] for {data.name}")
        self.is_set_up = True
        if self.stamper is not None and not self.stamper.is_set_up:  # named here, not handed over set up
            self.stamper.setup(data, resources)
            if self.stamper.state_dict() or self.stamper.stamps_per_batch:
                raise ConfigError("attack.trigger", f"{self.trigger} learns or redraws its trigger while training, "
                                  "so a given model's copy is unknown; name a fixed trigger (badnets, blended, ...)")

    @property
    def display_name(self) -> str:
        return f"given+{self.trigger}" if self.trigger is not None else "given"

    def named_trigger(self) -> Attack:
        """The attack whose trigger stamps the inputs, or one line saying to name it."""
        if self.stamper is None:
            raise ConfigError("attack.trigger", "this needs triggered inputs; name the trigger with attack.trigger=")
        return self.stamper

    def apply(self, x: Tensor) -> Tensor:
        return self.named_trigger().apply(x)

    @property
    def trigger_mask(self) -> Tensor | None:
        return self.stamper.trigger_mask if self.stamper is not None else None

    @property
    def trigger_pattern(self) -> Tensor | None:
        return self.stamper.trigger_pattern if self.stamper is not None else None

    def stamp(self, images: Tensor, device: torch.device | str = "cpu") -> Tensor:
        """The trigger's own stamping (an attack may stamp otherwise than by :meth:`apply`: an encoder, a
        reflection)."""
        return self.named_trigger().stamp(images, device)

    def poison_train(self, train: ImageSet, device: Any = "cpu") -> Any:
        raise ConfigError("attack", "a given model comes without its training set; pick a defense that needs none "
                          "(model inspection, input filtering or reformation, fine-tuning sanitisation)")
