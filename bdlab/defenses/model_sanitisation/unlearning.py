"""Unlearning (Neural Cleanse §6): fine-tune on clean images stamped with the recovered triggers, true labels kept."""

from __future__ import annotations

from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import OmegaConf

from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits, ImageSet, to_float, to_uint8
from bdlab.defenses.model_inspection.base import ModelInspection
from bdlab.defenses.model_sanitisation.base import ModelSanitization, fine_tune
from bdlab.errors import ConfigError, build, check_at_least, check_range
from bdlab.inversion.engine import Trigger
from bdlab.models.classifier import Classifier
from bdlab.plugins import load_option
from bdlab.services import RunServices
from bdlab.training.augment import TrainAugment


def build_inspector(node: Any, seed: int = 0) -> ModelInspection:
    """The inspector a defense names in its config: a node (``_target_`` and fields, left uninstantiated by
    ``_recursive_: false``) or a model-inspection option's name (``defense.inspector=abs``: that option's
    config, at ``seed``), refused in one line unless it is a model-inspection defense that recovers triggers."""
    option = load_option("defense", node) if isinstance(node, str) else None
    if option is not None:
        node = OmegaConf.merge(option, {"seed": seed})
    target = type(node) if isinstance(node, ModelInspection) else node.get("_target_") if hasattr(node, "get") \
        else node
    try:
        cls = target if isinstance(target, type) else get_object(str(target))
    except (ImportError, ValueError):  # hydra reports an unimportable or empty path as ImportError
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, ModelInspection) and cls.recovers_trigger):
        raise ConfigError("defense.inspector", f"{target!r} is not a model-inspection defense that recovers "
                          "triggers; name one: neural_cleanse, tabor, pixel, k_arm, uap, cw_l0, abs or deep_inspect "
                          "(df_tnd and neuron_inspect recover none)")
    return node if isinstance(node, ModelInspection) else build(node, path="defense.inspector")


class Unlearning(ModelSanitization):
    """Unlearning with recovered triggers (Wang et al., "Neural Cleanse", S&P 2019, §6.2 "Patching DNN via
    Unlearning"): the ``inspector`` (any model-inspection defense that recovers triggers: the inversion
    family, ABS or DeepInspect) recovers a trigger for every class of the trojaned model and flags the
    backdoor's target(s); a share ``share`` (20%, Neural Cleanse's) of the held-out clean images is stamped with the recovered
    trigger of a flagged class (the flagged classes in turn), their true labels kept, and the model is
    fine-tuned on all the held-out images with the run's recipe at learning rate ``lr`` for ``epochs``.
    With no class flagged, nothing is unlearnt and the model is returned unchanged
    (``defense/unlearnt_classes`` 0). The recovered triggers are the inspector's cached artifact, so
    an inspection run and an unlearning run with the same inspector share them.

    Args:
        inspector: a model-inspection defense that recovers triggers (``_target_`` and its fields, or the
            option's name: ``defense.inspector=abs``; default ``neural_cleanse``, its option's config).
        share: share of the held-out images stamped (default 0.2), in (0, 1].
        epochs: fine-tuning epochs (default 10).
        lr: fine-tuning learning rate (default 0.005; at 0.01 MNIST / LeNet loses 2.4 ACC points).
        seed: which images are stamped, and the fine-tuning's batch order.
    """

    name = "unlearning"

    def __init__(self, inspector: Any, share: float = 0.2, epochs: int = 10, lr: float = 0.005, seed: int = 0) -> None:
        self.inspector = build_inspector(inspector, seed)
        check_range("defense.share", share, 0.0, 1.0, low_open=True)
        check_at_least("defense.epochs", epochs, 1)
        if not lr > 0:
            raise ConfigError("defense.lr", f"got {lr}, must be > 0")
        self.share, self.epochs, self.lr, self.seed = float(share), int(epochs), float(lr), seed

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        self.inspector.setup(data, attack)

    def check_model(self, model: Classifier) -> None:
        self.inspector.check_model(model)

    def settings(self) -> dict[str, Any]:
        inspector = self.inspector  # what decides the recovered triggers and the flags, hence the unlearnt model
        return {"inspector": inspector.name, "share": self.share, "epochs": self.epochs, "lr": self.lr,
                "seed": self.seed,
                "inspector_settings": {**inspector.settings(), "seed": inspector.seed, "aiv_threshold":
                                       inspector.aiv_threshold, "optimisation_images": inspector.optimisation_images}}

    def stamped(self, held_out: ImageSet, triggers: Trigger, flagged: list[int]) -> ImageSet:
        """The held-out images with a seeded ``share`` of them carrying a flagged class's trigger."""
        generator = torch.Generator().manual_seed(self.seed)
        chosen = torch.randperm(len(held_out), generator=generator)[:max(1, round(self.share * len(held_out)))]
        images = held_out.images.clone()
        classes = torch.tensor(flagged)[torch.arange(len(chosen)) % len(flagged)]
        x = to_float(images[chosen])
        images[chosen] = to_uint8(torch.cat([triggers.stamp(x[i:i + 1], int(k)) for i, k in enumerate(classes)]))
        return ImageSet(images, held_out.labels)

    def sanitize(self, model: Classifier, context: RunServices) -> dict[str, Any]:
        inspection = self.inspector.inspect(model, context.data, context, context.trojan_key())
        if not inspection.flagged:
            return {"unlearnt_classes": 0}
        train = self.stamped(context.data.defense, inspection.trigger, inspection.flagged)
        augment = TrainAugment(context.data.crop_padding, context.data.hflip)
        fine_tune(model, train, context.recipe, self.epochs, self.lr, augment, self.seed, "unlearning")
        return {"unlearnt_classes": len(inspection.flagged)}
