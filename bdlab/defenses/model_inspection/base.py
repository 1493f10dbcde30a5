"""The model-inspection protocol (docs/metrics.md, "Model inspection"; TrojanZoo §5.3.3, Tables 11-13).

Every inspector (:class:`ModelInspection`) scores each class of a model from held-out clean images,
and some recover a trigger per class on the way: the trigger-inversion family
(:class:`TriggerInversion`: Neural Cleanse, TABOR, Pixel, K-Arm, UAP, CW-L0, whose score is the
trigger's size, small being suspicious), ABS (REASR, high), DF-TND (logit increase, high),
DeepInspect (perturbation magnitude, low) and NeuronInspect (explanation score, both sides). The
protocol runs on the trojaned model and on the clean reference (false positives) and reports, for
each (:func:`inspection_metrics`):

- per class: the score, its anomaly index (AIV, :func:`anomaly_index`), and where a trigger was
  recovered its size (footprint L1 norm, or the method's own size), #pixels and attack success on
  held-out images *not* used by the method, plus the method's extras (loss, ...);
- the flagged classes: AIV > ``aiv_threshold`` (2) on the inspector's suspicious side of the median,
  and the largest AIV on that side;
- for the attack's target class: its AIV, whether it is flagged, MLN (the L1 norm of its recovered
  footprint), MJS against the attack's true trigger mask (:func:`mask_jaccard`), #pixels
  (:func:`count_pixels`), its held-out attack success and final loss (NaN, not applicable, without a
  trigger, a loss, an attack, or for MJS a fixed trigger mask);
- ART, the inspection's running time per model.

Keys (trojaned model): ``defense/aiv_target``, ``defense/aiv_max``, ``defense/target_flagged``
(1 or 0), ``defense/flagged`` (count) and ``defense/flagged_classes``, ``defense/mln``,
``defense/mjs``, ``defense/pixels``, ``defense/trigger_asr``, ``defense/trigger_loss``,
``defense/art_s`` and per-class lists ``defense/per_class/{score,aiv,size,pixels,asr,...}``; the clean
reference's under ``defense/clean_...``. Each model's result is cached under ``inspection/<name>/``
(keyed by the model's key, the inspector's settings and the held-out images; a re-run reports the ART
measured when it ran), its per-class figures are written, one row per class with its name, to
``inspection_<model>.csv`` and its recovered triggers are drawn, captioned with the class names, in
``inspection_<model>.png``.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from abc import abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import median_abs_deviation
from torch import Tensor, nn

from bdlab.attacks.base import Attack, NoAttack
from bdlab.datasets.base import DatasetSplits, ImageSet, to_float
from bdlab.defenses.base import AIV, ART_MODEL, MJS, MLN, Defense, Residual
from bdlab.errors import ConfigError, check_at_least
from bdlab.evaluate import evaluate
from bdlab.inversion.engine import EpochScheduler, InversionEngine, InversionMethod, InversionResult, Schedule, Trigger
from bdlab.inversion.methods import LEVEL, changed_pixels
from bdlab.inversion.stacked import architecture
from bdlab.media import save_grid
from bdlab.services import SECONDS, RunServices

log = logging.getLogger(__name__)

MAD_SCALE = 1.4826  # Neural Cleanse's consistency constant: 1.4826 MAD estimates a normal's standard deviation
SIDES = ("low", "high", "both")
TRIGGER_PARTS = ("mask", "pattern", "delta")


def median(values: Tensor) -> float:
    """The median; of an even count the mean of the two middle values (torch.median takes the lower)."""
    return float(np.median(values.double().numpy()))


def anomaly_index(scores: Tensor) -> Tensor:
    """Neural Cleanse's anomaly index per class: ``|s - median| / (1.4826 MAD)``, MAD scipy's median absolute
    deviation (both medians of an even count the mean of the two middle values). With MAD 0 a score off
    the median is infinitely anomalous and one on it is not."""
    values = scores.double().numpy()
    deviation = torch.from_numpy(np.abs(values - np.median(values)))
    mad = float(median_abs_deviation(values, scale=1 / MAD_SCALE))
    if mad == 0:
        return torch.where(deviation > 0, math.inf, 0.0).double()
    return deviation / mad


def suspicious_side(scores: Tensor, suspicious: str) -> Tensor:
    """``(K,)`` bool: the classes on the ``suspicious`` side of the median (``low``, ``high``, or ``both``:
    every class off the median)."""
    centre, scores = median(scores), scores.double()
    return scores < centre if suspicious == "low" else scores > centre if suspicious == "high" else scores != centre


def flagged_classes(scores: Tensor, threshold: float = 2.0, suspicious: str = "low") -> list[int]:
    """Classes whose score is an outlier (AIV above ``threshold``) on the ``suspicious`` side of the median
    (``low`` by default: abnormally small triggers)."""
    aiv, side = anomaly_index(scores), suspicious_side(scores, suspicious)
    return [k for k in range(len(scores)) if aiv[k] > threshold and bool(side[k])]


def mask_jaccard(footprint: Tensor, true_mask: Tensor) -> float:
    """MJS (TrojanZoo Eq. 6): the Jaccard index of the true mask and the recovered footprint binarised to
    its ``|true mask|`` largest pixels, so an exact recovery of a binary trigger scores 1.0."""
    truth = true_mask.bool().flatten()
    count = int(truth.sum())
    if count == 0:
        return math.nan
    recovered = torch.zeros_like(truth)
    recovered[footprint.flatten().topk(count).indices] = True
    return float((recovered & truth).sum()) / float((recovered | truth).sum())


def count_pixels(trigger: Trigger) -> Tensor:
    """#pixels per class: positions changed by at least one 8-bit level, in any channel (Pixel paper):
    the mask's pixels at >= 1/255 for mask-and-pattern triggers, the perturbed ones for additive ones."""
    return torch.maximum(changed_pixels(trigger.delta), (trigger.mask[:, 0] >= LEVEL).flatten(1).sum(1).float())


def with_holdout_success(tensors: dict[str, Tensor], model: nn.Module, images: ImageSet) -> dict[str, Tensor]:
    """An inspector's tensors on the CPU, with, where it recovered a trigger per class, the trigger's
    held-out ``success`` on ``images`` (:func:`holdout_success`)."""
    tensors = {k: v.detach().cpu() for k, v in tensors.items()}
    if "mask" in tensors:
        tensors["success"] = holdout_success(model, Trigger(*(tensors[part] for part in TRIGGER_PARTS)), images)
    return tensors


def holdout_success(model: nn.Module, trigger: Trigger, images: ImageSet, classes: Tensor | None = None) -> Tensor:
    """Per trigger ``i`` (of class ``classes[i]``, default ``i``): the evaluator's ASR, percent of ``images``
    not of that class that the trigger sends to it."""
    classes = torch.arange(len(trigger.mask)) if classes is None else classes
    return torch.tensor([evaluate(model, None, images.subset(images.labels != k), k,
                                  lambda x, i=i: trigger.stamp(x, i)).asr for i, k in enumerate(classes.tolist())])


@dataclass
class InspectionResult:
    """One model's inspection: per-class ``scores``, the ``suspicious`` side of their median (``low`` for
    trigger sizes), AIV, the flagged classes, the running time (s), an optional recovered ``trigger`` per
    class with its held-out ``success`` (%), and per-class ``extras`` (``size``, ``loss``, ...)."""

    scores: Tensor
    suspicious: str
    aiv: Tensor
    flagged: list[int]
    seconds: float
    trigger: Trigger | None = None
    success: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


class ModelInspection(Defense):
    """Base of every model-inspection defense: a per-class score from held-out clean images, outliers by
    Neural Cleanse's anomaly index on the ``suspicious`` side, and optionally a recovered trigger.

    Subclasses implement :meth:`score` (tensors: ``score`` ``(K,)``; optionally ``mask``, ``pattern``,
    ``delta`` of a recovered :class:`~bdlab.inversion.engine.Trigger` per class; any other ``(K,)``
    tensor is an extra, reported per class) and :meth:`settings` (the cache key), and set
    ``suspicious`` and ``recovers_trigger`` (whether unlearning can use what it recovers).

    Args:
        optimisation_images: held-out clean images the method reads (the first ones).
        evaluation_images: further, disjoint held-out images the recovered triggers' success is measured on.
        aiv_threshold: AIV above which a class on the suspicious side is flagged (default 2, Neural Cleanse's).
        seed: the method's random draws.
    """

    category = "model_inspection"
    headline_metrics = (
        AIV,
        ("defense/target_flagged", "Model inspection: target class flagged (1) or not (0)"),
        ("defense/clean_aiv_max", "Model inspection: largest AIV on the clean model (false positives above 2)"),
        MLN,
        MJS,
        ("defense/pixels", "Model inspection: #pixels of the target's recovered trigger"),
        ("defense/trigger_asr", "Model inspection: held-out ASR of the target's recovered trigger (%)"),
        ART_MODEL,
    )
    # an inspector changes no model, so no ASR is left and no accuracy is lost: its verdict on the target is the answer
    residual = Residual("target class flagged or missed, with its AIV", flagged="defense/target_flagged",
                        aiv="defense/aiv_target")
    suspicious = "low"
    recovers_trigger = True

    def __init__(self, optimisation_images: int, evaluation_images: int, aiv_threshold: float = 2.0,
                 seed: int = 0) -> None:
        check_at_least("defense.optimisation_images", optimisation_images, 1)
        check_at_least("defense.evaluation_images", evaluation_images, 1)
        if not aiv_threshold > 0:
            raise ConfigError("defense.aiv_threshold", f"got {aiv_threshold}, must be > 0")
        self.optimisation_images, self.evaluation_images = int(optimisation_images), int(evaluation_images)
        self.aiv_threshold, self.seed = float(aiv_threshold), int(seed)

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        needed = self.optimisation_images + self.evaluation_images
        if needed > len(data.defense):
            raise ConfigError("defense.optimisation_images", f"{self.optimisation_images} optimisation + "
                              f"{self.evaluation_images} evaluation images are asked for, but the held-out split "
                              f"has {len(data.defense)}; lower them or raise dataset.defense_fraction")

    def splits(self, data: DatasetSplits) -> tuple[ImageSet, ImageSet]:
        """The held-out images the method reads, and the disjoint ones its results are evaluated on."""
        first = torch.arange(self.optimisation_images)
        rest = torch.arange(self.optimisation_images, self.optimisation_images + self.evaluation_images)
        return data.defense.subset(first), data.defense.subset(rest)

    @abstractmethod
    def score(self, model: nn.Module, images: ImageSet, num_classes: int, services: RunServices) -> dict[str, Tensor]:
        """The per-class scores of ``model`` from held-out ``images`` (and any recovered triggers)."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The method's settings: part of the cache key of its results."""

    def flag(self, scores: Tensor) -> list[int]:
        """The flagged classes: AIV above the threshold on the suspicious side."""
        return flagged_classes(scores, self.aiv_threshold, self.suspicious)

    def inspect(self, model: nn.Module, data: DatasetSplits, services: RunServices,
                model_key: str | None = None) -> InspectionResult:
        """Score every class of ``model`` and measure any recovered trigger's held-out success, through
        ``services``' cache (keyed by ``model_key``, by default the digest of the model's weights), and
        find the outliers. The running time is the build's, as measured when it ran."""
        optimisation, evaluation = self.splits(data)

        def build() -> dict[str, Tensor]:
            return with_holdout_success(self.score(model, optimisation, data.num_classes, services), model,
                                        evaluation)

        tensors, seconds = services.cached(self.cache_kind(), self.cache_spec(model, data, services, model_key), build)
        scores = tensors.pop("score").double()
        trigger = Trigger(*(tensors.pop(part) for part in TRIGGER_PARTS)) if "mask" in tensors else None
        success = tensors.pop("success", None)
        return InspectionResult(scores, self.suspicious, anomaly_index(scores), self.flag(scores), seconds,
                                trigger, success, tensors)

    def cache_kind(self) -> str:
        return f"inspection/{self.name}"

    def cache_spec(self, model: nn.Module, data: DatasetSplits, services: RunServices,
                   model_key: str | None = None) -> dict[str, Any]:
        """The cache key of ``model``'s inspection (see :meth:`inspect`)."""
        optimisation, evaluation = self.splits(data)
        return {"model": model_key or services.digest(*model.state_dict().values()), "inspector": self.name,
                "settings": self.settings(), "seed": self.seed, "images": services.digest(optimisation, evaluation)}

    def inspect_many(self, models: Sequence[nn.Module], data: DatasetSplits, services: RunServices,
                     model_keys: Sequence[str]) -> list[InspectionResult]:
        """:meth:`inspect` each of ``models`` (a population scan: same dataset, same held-out images), in order.
        One model at a time here; an inspector that can stack models of one architecture overrides this."""
        return [self.inspect(model, data, services, key) for model, key in zip(models, model_keys)]

    def run(self, context: RunServices) -> dict[str, Any]:
        """Inspect the trojaned model and the clean reference (the same model without an attack), report
        both and the target's metrics, and draw the recovered triggers."""
        data = context.data
        log.info("%s: inspecting the trojaned model (and the clean reference): a score for each of %d classes from "
                 "%d held-out images", self.name, data.num_classes, self.optimisation_images)
        trojan = self.inspect(context.trojan_model(), data, context, context.trojan_key())
        clean = trojan if not context.has_attack() else \
            self.inspect(context.clean_model(), data, context, context.clean_key()) if context.has_clean_reference() \
            else None
        metrics = inspection_metrics(trojan, "defense/", context.attack)
        # a given model without a clean reference: the clean model's figures are not applicable
        metrics.update(inspection_metrics(clean, "defense/clean_") if clean is not None else
                       {"defense/clean_aiv_max": math.nan, "defense/clean_flagged": math.nan})
        _, evaluation = self.splits(data)
        for name, inspection, prefix in (("trojan", trojan, "defense/"), ("clean", clean, "defense/clean_")):
            if inspection is not None:
                write_per_class_table(metrics, prefix, data, Path(context.output_dir) / f"inspection_{name}.csv")
            if inspection is not None and inspection.trigger is not None:
                path = Path(context.output_dir) / f"inspection_{name}.png"
                draw_recovered_triggers(inspection.trigger, evaluation, path, data.class_names)
        return metrics


TARGET_KEYS = ("aiv_target", "target_flagged", "mln", "mjs", "pixels", "trigger_asr", "trigger_loss")


def inspection_metrics(inspection: InspectionResult, prefix: str, attack: Attack | None = None) -> dict[str, Any]:
    """The protocol's keys of one model under ``prefix``: the largest AIV on the suspicious side, the flags,
    ART and the per-class lists; given the run's ``attack``, its target class's ``defense/...`` keys too (AIV,
    flag, and from its recovered trigger MLN, MJS, #pixels, held-out ASR and loss; NaN where not applicable,
    all of them without an attack)."""
    side = suspicious_side(inspection.scores, inspection.suspicious)
    trigger = inspection.trigger
    metrics: dict[str, Any] = {
        f"{prefix}aiv_max": max((float(inspection.aiv[k]) for k in range(len(side)) if side[k]), default=0.0),
        f"{prefix}flagged": len(inspection.flagged),
        f"{prefix}flagged_classes": inspection.flagged,
        f"{prefix}art_s": inspection.seconds,
        f"{prefix}per_class/score": inspection.scores.tolist(),
        f"{prefix}per_class/aiv": inspection.aiv.tolist(),
    }
    if trigger is not None:
        metrics[f"{prefix}per_class/size"] = trigger.footprint.flatten(1).sum(1).tolist()
        metrics[f"{prefix}per_class/pixels"] = count_pixels(trigger).tolist()
        metrics[f"{prefix}per_class/asr"] = inspection.success.tolist()
    for name, values in inspection.extras.items():  # a method's own size replaces the footprint's
        metrics[f"{prefix}per_class/{name}"] = values.tolist()
    if attack is None:
        return metrics
    metrics.update({f"defense/{key}": math.nan for key in TARGET_KEYS})
    if isinstance(attack, NoAttack) or not attack.known_target:
        return metrics
    target, true_mask = attack.target_class, attack.trigger_mask
    metrics["defense/aiv_target"] = float(inspection.aiv[target])
    metrics["defense/target_flagged"] = float(target in inspection.flagged)
    if trigger is not None:
        metrics["defense/mln"] = float(trigger.footprint[target].sum())
        metrics["defense/mjs"] = math.nan if true_mask is None else \
            mask_jaccard(trigger.footprint[target, 0], true_mask)
        metrics["defense/pixels"] = float(count_pixels(trigger)[target])
        metrics["defense/trigger_asr"] = float(inspection.success[target])
    if "loss" in inspection.extras:
        metrics["defense/trigger_loss"] = float(inspection.extras["loss"][target])
    return metrics


def write_per_class_table(metrics: dict[str, Any], prefix: str, data: DatasetSplits, path: Path) -> Path:
    """The per-class lists of ``metrics`` under ``prefix`` as a CSV: one row per class, its index and name first."""
    lists = {key.removeprefix(f"{prefix}per_class/"): values for key, values in metrics.items()
             if key.startswith(f"{prefix}per_class/")}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["class", "class_name", *lists])
        writer.writerows([k, data.class_name(k), *(values[k] for values in lists.values())]
                         for k in range(data.num_classes))
    return path


def draw_recovered_triggers(trigger: Trigger, images: ImageSet, path: Path,
                            class_names: tuple[str, ...] | None = None) -> Path:
    """One column per class: the recovered footprint (max-normalised) over the trigger stamped on the
    first of ``images``, 3x enlarged, written as a PNG grid to ``path``; with ``class_names``, each column
    is captioned with its class."""
    image = to_float(images.images[:1])
    footprint = trigger.footprint / trigger.footprint.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]
    stamped = torch.cat([trigger.stamp(image, k) for k in range(len(trigger.mask))])
    rows = torch.cat([footprint.expand(-1, stamped.shape[1], -1, -1), stamped])
    rows = torch.nn.functional.interpolate(rows, scale_factor=3, mode="nearest")
    captions = None if class_names is None else [""] * len(trigger.mask) + list(class_names)
    return save_grid(rows, path, len(trigger.mask), padding=2, captions=captions)


class TriggerInversion(ModelInspection):
    """The trigger-inversion family on the batched engine (:class:`~bdlab.inversion.engine.InversionEngine`):
    subclasses give the inversion method (and a scheduler). The score is the recovered trigger's size
    (small is suspicious); ``size``, the final ``loss`` and the ``epochs`` run are the extras.

    Args:
        epochs: passes over the optimisation images (default 100).
        batch_size: optimisation images per step (default 32, Neural Cleanse's).
        lr: Adam step size (default null: the method's).
        threshold: attack success, on the optimisation images, at which a trigger counts as found
            (in (0, 1]; default 0.99, Neural Cleanse's).
        init_weight, up, down, patience, early_stop_patience: lambda's schedule (Neural Cleanse's:
            1e-3, x1.5, /1.5^1.5, 5 epochs, 25 epochs).
        mode: ``batched`` (default, every class at once) or ``sequential`` (the same code per class).
        restarts: independent starts per class, in the same batch; each class keeps its best (default 1).
        optimisation_images: held-out images the triggers are optimised on (default 300).
        evaluation_images: further held-out images their attack success is measured on (default 200).
        aiv_threshold: AIV above which a small trigger's class is flagged (default 2, Neural Cleanse's).
        seed: the initial triggers and the image order.
    """

    def __init__(self, epochs: int = 100, batch_size: int = 32, lr: float | None = None, threshold: float = 0.99,
                 init_weight: float = 1e-3, up: float = 1.5, down: float = 1.5 ** 1.5, patience: int = 5,
                 early_stop_patience: int = 25, mode: str = "batched", restarts: int = 1,
                 optimisation_images: int = 300, evaluation_images: int = 200, aiv_threshold: float = 2.0, seed: int = 0) -> None:
        super().__init__(optimisation_images, evaluation_images, aiv_threshold, seed)
        schedule = Schedule(init_weight, up, down, patience, early_stop_patience)
        self.engine = InversionEngine(self.method(), epochs, batch_size, lr, threshold, schedule, mode, seed, restarts)
        self.engine_settings = {"epochs": epochs, "batch_size": batch_size, "lr": self.engine.lr,
                                "threshold": threshold, "schedule": [init_weight, up, down, patience,
                                                                     early_stop_patience], "mode": mode}
        if restarts > 1:  # only then, so triggers recovered before the option keep their cache key
            self.engine_settings["restarts"] = restarts

    @abstractmethod
    def method(self) -> InversionMethod:
        """The inversion method this inspector runs on the engine."""

    def method_settings(self) -> dict[str, Any]:
        """The method's own settings, part of the recovered triggers' cache key."""
        return {}

    def settings(self) -> dict[str, Any]:
        return {**self.engine_settings, **self.method_settings()}

    def scheduler(self) -> EpochScheduler | None:
        """Which classes each epoch optimises (default: every live class)."""
        return None

    def score(self, model: nn.Module, images: ImageSet, num_classes: int, services: RunServices) -> dict[str, Tensor]:
        return self.tensors(self.engine.run(model, to_float(images.images), images.labels, list(range(num_classes)),
                                            scheduler=self.scheduler()))

    @staticmethod
    def tensors(result: InversionResult) -> dict[str, Tensor]:
        """What an inversion's result gives the protocol: the size as the score, the triggers and the extras."""
        trigger = result.trigger  # the size twice, as the score and as the extra: a copy, safetensors stores no aliases
        return {"score": result.size, "mask": trigger.mask, "pattern": trigger.pattern, "delta": trigger.delta,
                "size": result.size.clone(), "loss": result.loss, "epochs": result.epochs}

    def stacks_models(self) -> bool:
        """Whether :meth:`inspect_many` inverts models of one architecture together: on the standard engine
        (``stackable``) in its batched mode; another engine (Pixel's released schedule) runs one at a time."""
        return getattr(self.engine, "stackable", False) and self.engine.mode == "batched"

    def inspect_many(self, models: Sequence[nn.Module], data: DatasetSplits, services: RunServices,
                     model_keys: Sequence[str]) -> list[InspectionResult]:
        """:meth:`~ModelInspection.inspect` each of ``models``, inverting together those not in the cache.

        A model whose inspection is cached (the key :meth:`inspect` uses) comes from the cache. The others,
        grouped by architecture, are inverted together where :meth:`stacks_models` allows, by the engine's
        multi-model form (:meth:`~bdlab.inversion.engine.InversionEngine.run_many`: one forward of every
        model per step, each with its own scheduler, the results a one-model run's up to rounding); each
        model's held-out success is then measured as :meth:`inspect` does, and its result stored under
        :meth:`inspect`'s key, so a later one-model inspection finds it. The seconds recorded for each model
        of a group are the group's wall time (inversion and held-out success) divided by its size. A group of
        one, or an inspector that does not stack, goes through :meth:`inspect` (a scan's ``batch_models=1``
        gives one model at a time).
        """
        keys = list(model_keys)
        if len(models) != len(keys):
            raise ValueError(f"{len(models)} models but {len(keys)} model keys; give one key per model")
        if len(models) < 2 or not self.stacks_models():
            return super().inspect_many(models, data, services, keys)
        kind = self.cache_kind()
        specs = [self.cache_spec(model, data, services, key) for model, key in zip(models, keys)]
        groups: dict[Hashable, list[int]] = {}
        for i, (model, spec) in enumerate(zip(models, specs)):
            if services.cache.read(services.cache.path(kind, spec), lambda tensors: SECONDS in tensors) is None:
                groups.setdefault(architecture(model), []).append(i)
        for members in groups.values():
            if len(members) > 1:
                self._invert_together([models[i] for i in members], [specs[i] for i in members], data, services)
        # every result as inspect() makes it: from the cache now, or (a group of one) inverted alone
        return [self.inspect(model, data, services, key) for model, key in zip(models, keys)]

    def _invert_together(self, models: list[nn.Module], specs: list[dict[str, Any]], data: DatasetSplits,
                         services: RunServices) -> None:
        """Invert ``models`` in one run and store each one's inspection under its ``spec``."""
        optimisation, evaluation = self.splits(data)
        log.info("%s: inverting the triggers of %d models at once", self.name, len(models))
        started = time.perf_counter()
        results = self.engine.run_many(models, to_float(optimisation.images), optimisation.labels,
                                       list(range(data.num_classes)), schedulers=[self.scheduler() for _ in models])
        built = [with_holdout_success(self.tensors(result), model, evaluation)
                 for model, result in zip(models, results)]
        share = torch.tensor((time.perf_counter() - started) / len(models), dtype=torch.float64)
        for spec, tensors in zip(specs, built):
            services.cache.get_or_build(self.cache_kind(), spec, lambda tensors=tensors: {**tensors, SECONDS: share},
                                        lambda stored: SECONDS in stored)
