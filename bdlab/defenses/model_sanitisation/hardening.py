"""Hardening (the Pixel paper §5.4, App. L.1) as a model sanitiser, and the class distance it is measured
by (Eq. 12)."""

from __future__ import annotations

import math
import random
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from bdlab.attacks.base import Attack
from bdlab.datasets.base import DatasetSplits, ImageSet, to_float
from bdlab.defenses.model_sanitisation.base import ModelSanitization
from bdlab.errors import ConfigError, check_at_least, check_range
from bdlab.inversion.engine import InversionEngine, InversionMethod, Schedule
from bdlab.inversion.methods import NeuralCleanseTrigger, PixelTrigger, UAPTrigger
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices
from bdlab.training.fit import fit_classifier
from bdlab.training.hooks import TrainingHooks

GENERATORS = ("nc", "pixel", "uap")
DISTANCES = ("nc", "pixel")


SCHEDULE = Schedule()
# a generated trigger is stamped once it sends this share of the batch's images to its class
SUCCESS = 0.9


def generator_method(name: str, epsilon: float) -> InversionMethod:
    return {"nc": NeuralCleanseTrigger, "pixel": PixelTrigger}[name]() if name != "uap" else UAPTrigger(epsilon)


class TriggerHardening(TrainingHooks):
    """Model hardening's hooks on the victim module (the Pixel paper, Tao et al. CVPR 2022, §5.4 and
    App. L.1): like adversarial training, every batch carries triggers generated against the current
    model, with their true labels.

    The generator (an inversion method: Neural Cleanse's mask and pattern, which makes this the
    paper's "iterative NC", Pixel's perturbation, or a UAP) keeps one universal trigger per class.
    At each step a target class is drawn; its trigger takes ``inner_steps`` Adam steps (learning
    rate the generator's) on ``attack loss + lambda x regulariser`` over a ``share`` of the batch's
    images of the other classes, with the model in eval mode and untouched. lambda follows Neural
    Cleanse's schedule per update (x1.5 when the trigger sends 90% of them to its class, /1.5^1.5
    when not), so the triggers stay near the smallest that work; a trigger that works is stamped on
    those images, which keep their true labels, and the model takes its step on the whole batch (a
    trigger that does not work yet is not trained against: it would be noise with a label). The
    triggers carry over from batch to batch (warm starts: a universal trigger, unlike a PGD
    perturbation, is worth keeping).

    Args:
        generator: the inversion method that generates the triggers.
        num_classes: the model's classes.
        shape: the images' ``(C, H, W)``.
        share: share of the other-class images of a batch that carry the trigger.
        inner_steps: generator steps per training step.
        weight: the generator's initial regulariser weight (lambda).
        seed: the initial triggers.
    """

    def __init__(self, generator: InversionMethod, num_classes: int, shape: tuple[int, int, int], share: float,
                 inner_steps: int, weight: float, seed: int) -> None:
        self.generator, self.num_classes, self.share = generator, num_classes, share
        self.inner_steps = inner_steps
        self.weights = [weight] * num_classes
        self.triggers = generator.variables(list(range(num_classes)), shape, seed)
        self.trigger_optimizers: list[torch.optim.Optimizer] = []

    def after_augment(self, module: pl.LightningModule, x: Tensor, labels: Tensor,
                      is_poison: Tensor) -> tuple[Tensor, Tensor]:
        if not self.trigger_optimizers:  # first batch: the triggers go where the model is
            self.triggers = {name: [value.to(x.device).requires_grad_(True) for value in values]
                             for name, values in self.triggers.items()}
            self.trigger_optimizers = [torch.optim.Adam([values[k] for values in self.triggers.values()],
                                                        lr=self.generator.lr, betas=(0.5, 0.9))
                                       for k in range(self.num_classes)]
        return self.harden(module.model, x, labels), labels

    def harden(self, model: Classifier, x: Tensor, labels: Tensor) -> Tensor:
        """A ``share`` of the batch's other-class images stamped with the drawn class's refreshed trigger."""
        target = int(torch.randint(self.num_classes, (1,)))
        pool = (labels != target).nonzero().flatten()
        chosen = pool[torch.randperm(len(pool), device=pool.device)[:round(self.share * len(pool))]]
        if len(chosen) == 0:
            return x
        images = x[chosen].detach()[None]
        goal = torch.tensor([target], device=x.device)
        parameters = [values[target] for values in self.triggers.values()]
        training = model.training
        model.eval()
        for _ in range(self.inner_steps):
            stamped = self.generator.stamp(self.triggers, [target], images)
            logits = model(stamped[0])
            loss = self.generator.attack_loss(logits[None], goal).mean() + \
                self.weights[target] * self.generator.regulariser(self.triggers, [target], images).sum()
            gradients = torch.autograd.grad(loss, parameters)  # the trigger's alone: the model is not stepped here
            for parameter, gradient in zip(parameters, gradients):
                parameter.grad = gradient
            self.trigger_optimizers[target].step()
            with torch.no_grad():
                self.generator.project(self.triggers, [target])
        model.train(training)
        success = float((logits.argmax(1) == target).float().mean())
        # Neural Cleanse's schedule, per update: a trigger that works is pushed to shrink, one that does not to grow
        self.weights[target] *= SCHEDULE.up if success >= SUCCESS else 1 / SCHEDULE.down
        if success < SUCCESS:
            return x  # only a trigger that works on the current model is trained against
        with torch.no_grad():
            x = x.clone()
            x[chosen] = self.generator.stamp(self.triggers, [target], images)[0]
        return x


def class_distance(model: nn.Module, held_out: ImageSet, pairs: list[tuple[int, int]], method: InversionMethod,
                   epochs: int, images_per_source: int, seed: int) -> Tensor:
    """The Pixel paper's class distance ``d(i -> j)`` for each pair (App. L.1): the size of the smallest
    trigger the engine finds that flips 90% of (up to ``images_per_source``) held-out images of class
    ``i`` to ``j`` (mask L1 norm for Neural Cleanse, #pixels for Pixel); NaN where none reaches 90%.
    Every pair is inverted in one batch."""
    keep = torch.cat([(held_out.labels == source).nonzero().flatten()[:images_per_source]
                      for source in sorted({i for i, _ in pairs})])
    engine = InversionEngine(method, epochs=epochs, threshold=0.9, seed=seed)
    result = engine.run(model, to_float(held_out.images[keep]), held_out.labels[keep], [j for _, j in pairs],
                        sources=[i for i, _ in pairs])
    return torch.where(result.reached, result.size, torch.full_like(result.size, math.nan))


def distance_gain(before: Tensor, after: Tensor) -> float:
    """Eq. 12: the mean relative improvement ``(d_hat - d) / d`` over the pairs, in percent (pairs whose
    distance is undefined before or after are left out; NaN when none is left)."""
    valid = ~(before.isnan() | after.isnan()) & (before > 0)
    if not bool(valid.any()):
        return math.nan
    return 100.0 * float(((after[valid] - before[valid]) / before[valid]).mean())


class Hardening(ModelSanitization):
    """Model hardening (Tao et al., "Better Trigger Inversion Optimization in Backdoor Scanning", CVPR 2022,
    §5.4, App. L.1, Table 7): fine-tune the model with the victim module and :class:`TriggerHardening`'s
    hooks, which stamp universal triggers generated on the fly (``generator``: ``nc``, the paper's iterative
    NC; ``pixel``, the paper's method; ``uap``, bounded by ``epsilon``) on a ``share`` of each batch,
    true labels kept. ``data`` is what it trains on: the held-out clean split (``held_out``, default:
    the data a defender has) or the training set (``train``: with ``attack=none`` it is clean, the
    paper's setting for hardening a clean model).

    Besides the sanitisation protocol's metrics it measures the class distance before and after
    (:func:`class_distance`, with Neural Cleanse and with Pixel) over ``pairs`` seeded class pairs
    (or the explicit ``pair_list``), each inverted for ``distance_epochs`` epochs on up to
    ``distance_images`` held-out images of the source class, and reports Eq. 12's relative gain:
    ``defense/class_distance_<nc|pixel>_before``, ``..._after`` (means over the pairs) and
    ``defense/class_distance_gain_<nc|pixel>`` (percent).

    Args:
        generator: ``pixel`` (default), ``nc`` or ``uap``.
        data: ``held_out`` (default) or ``train``.
        epochs: fine-tuning epochs (default 1).
        lr: fine-tuning learning rate (default 0.01).
        share: share of each batch's other-class images stamped (default 0.2).
        inner_steps: generator steps per training step (default 5).
        weight: the generator's regulariser weight (default 1e-3, Neural Cleanse's initial lambda).
        epsilon: the UAP generator's L-infinity bound (default 0.1).
        pairs: number of seeded class pairs the distance is measured on (default 20; at most K(K-1)).
        pair_list: explicit ``[[source, target], ...]`` pairs instead (default null).
        distance_epochs: inversion epochs per distance measurement (default 30).
        distance_images: held-out images per source class (default 50; at most the held-out images of
            the largest class).
        seed: triggers, pairs and batch order.
    """

    name = "hardening"

    def __init__(self, generator: str = "pixel", data: str = "held_out", epochs: int = 1, lr: float = 0.01,
                 share: float = 0.2, inner_steps: int = 5, weight: float = 1e-3, epsilon: float = 0.1,
                 pairs: int = 20, pair_list: list[list[int]] | None = None, distance_epochs: int = 30,
                 distance_images: int = 50, seed: int = 0) -> None:
        if generator not in GENERATORS:
            raise ConfigError("defense.generator", f"got {generator!r}, must be one of {', '.join(GENERATORS)}")
        if data not in ("held_out", "train"):
            raise ConfigError("defense.data", f"got {data!r}, must be held_out or train")
        for field, value in (("epochs", epochs), ("inner_steps", inner_steps), ("pairs", pairs),
                             ("distance_epochs", distance_epochs), ("distance_images", distance_images)):
            check_at_least(f"defense.{field}", value, 1)
        check_range("defense.share", share, 0.0, 1.0, low_open=True)
        check_range("defense.epsilon", epsilon, 0.0, 1.0, low_open=True)
        if not lr > 0:
            raise ConfigError("defense.lr", f"got {lr}, must be > 0")
        if not weight >= 0:
            raise ConfigError("defense.weight", f"got {weight}, must be >= 0")
        self.generator, self.data, self.epochs, self.lr, self.share = generator, data, int(epochs), float(lr), share
        self.inner_steps, self.weight, self.epsilon = int(inner_steps), float(weight), float(epsilon)
        self.pairs, self.pair_list = int(pairs), [list(p) for p in pair_list] if pair_list is not None else None
        self.distance_epochs, self.distance_images, self.seed = int(distance_epochs), int(distance_images), seed
        self.chosen_pairs: list[tuple[int, int]] = []

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        classes = data.num_classes
        if self.pair_list is not None:
            for pair in self.pair_list:
                if len(pair) != 2 or pair[0] == pair[1] or not all(0 <= c < classes for c in pair):
                    raise ConfigError("defense.pair_list", f"pair {pair} is not two different classes in "
                                      f"[0, {classes - 1}]")
            self.chosen_pairs = [(int(i), int(j)) for i, j in self.pair_list]
        else:
            every = [(i, j) for i in range(classes) for j in range(classes) if i != j]
            if self.pairs > len(every):
                raise ConfigError("defense.pairs", f"got {self.pairs}, but {data.name} has {classes} classes: at most "
                                  f"{len(every)} ordered pairs (K(K-1))")
            self.chosen_pairs = random.Random(self.seed).sample(every, self.pairs)
        largest = int(data.defense.labels.bincount(minlength=classes).max()) if len(data.defense) else 0
        if self.distance_images > largest:
            raise ConfigError("defense.distance_images", f"got {self.distance_images}, but the held-out split's "
                              f"largest class has {largest} images; at most that many (dataset.defense_fraction)")

    def settings(self) -> dict[str, Any]:
        return {"generator": self.generator, "data": self.data, "epochs": self.epochs, "lr": self.lr,
                "share": self.share, "inner_steps": self.inner_steps, "weight": self.weight,
                "epsilon": self.epsilon, "seed": self.seed}

    def sanitize(self, model: Classifier, context: RunServices) -> dict[str, Any]:
        data = context.data
        train = data.defense if self.data == "held_out" else ImageSet(data.train.images, data.train.labels)
        hooks = TriggerHardening(generator_method(self.generator, self.epsilon), data.num_classes,
                                 data.input_shape, self.share, self.inner_steps, self.weight, self.seed)
        fit_classifier(model, train, context.recipe.variant(self.epochs, self.lr), context.augment(), hooks,
                       name="hardened", seed=self.seed)
        return {}

    def distances(self, model: Classifier, name: str, context: RunServices, model_key: str | None) -> Tensor:
        """Class distances by ``name`` (``nc`` or ``pixel``) over the chosen pairs; cached for a model with a key."""
        def build() -> dict[str, Tensor]:
            return {"distance": class_distance(model, context.data.defense, self.chosen_pairs,
                                               generator_method(name, self.epsilon), self.distance_epochs,
                                               self.distance_images, self.seed)}

        if model_key is None:
            return build()["distance"]
        spec = {"model": model_key, "method": name, "pairs": self.chosen_pairs, "epochs": self.distance_epochs,
                "images": self.distance_images, "seed": self.seed, "held_out": context.digest(context.data.defense)}
        return context.cached("inspection/class_distance", spec, build)[0]["distance"]

    def compare(self, context: RunServices, before: Classifier, after: Classifier) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        for name in DISTANCES:
            distances = [self.distances(before, name, context, context.trojan_key()),
                         self.distances(after, name, context, None)]
            metrics[f"defense/class_distance_{name}_before"] = float(distances[0].nanmean())
            metrics[f"defense/class_distance_{name}_after"] = float(distances[1].nanmean())
            metrics[f"defense/class_distance_gain_{name}"] = distance_gain(*distances)
        return metrics
