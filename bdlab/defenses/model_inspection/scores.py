"""Model inspection from a per-class score vector (ABS, DF-TND, DeepInspect, NeuronInspect).

:class:`~bdlab.defenses.model_inspection.base.ModelInspection` is built around the trigger-inversion engine,
whose per-class score is a trigger *size* (small is suspicious). The inspectors here compute a
per-class score their own way, and some of them find backdoors on the *high* side (ABS's REASR,
DF-TND's logit increase, NeuronInspect's explanation score). This base turns any such vector into
the protocol's keys, so they sit in the same report tables as Neural Cleanse:

- per class: the score (``defense/per_class/score``), its anomaly index (AIV, Neural Cleanse's
  MAD rule, :func:`~bdlab.defenses.model_inspection.base.anomaly_index`), and where the method recovers a
  trigger, its size and held-out attack success;
- flagged classes: AIV > ``aiv_threshold`` on the inspector's ``suspicious`` side of the median;
- the attack's target class: AIV, flag, and for methods with a trigger MLN, MJS, #pixels and its
  held-out ASR (NaN, "n/a" in the report, for a method without one, e.g. NeuronInspect);
- ART, and all of it again for the clean reference model under ``defense/clean_...``.

Each model's result is cached under ``inspection/<name>/`` (keyed by the model's key, the settings
and the held-out images), so a re-run reads it and reports the ART measured when it ran.
"""

from __future__ import annotations

import hashlib
import math
import time
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bdlab.attacks.base import Attack, NoAttack
from bdlab.cache import ArtifactCache
from bdlab.datasets.base import DatasetSplits, ImageSet
from bdlab.defenses.base import Defense
from bdlab.defenses.model_inspection.base import (
    HeldOutShares,
    ModelInspection,
    anomaly_index,
    count_pixels,
    draw_recovered_triggers,
    holdout_success,
    inspect_trojan_and_clean,
    mask_jaccard,
    median,
)
from bdlab.errors import ConfigError, check_at_least
from bdlab.inversion.engine import Trigger
from bdlab.services import RunServices

SIDES = ("high", "low", "both")


def suspicious_side(scores: Tensor, suspicious: str) -> Tensor:
    """``(K,)`` bool: the classes on the ``suspicious`` side of the median (``high``, ``low``, or ``both``:
    every class off the median)."""
    centre, scores = median(scores), scores.double()
    if suspicious == "high":
        return scores > centre
    if suspicious == "low":
        return scores < centre
    return scores != centre


def flagged_by_score(scores: Tensor, threshold: float = 2.0, suspicious: str = "high") -> list[int]:
    """Classes whose score is an outlier (AIV above ``threshold``) on the ``suspicious`` side of the median."""
    aiv, side = anomaly_index(scores), suspicious_side(scores, suspicious)
    return [k for k in range(len(scores)) if aiv[k] > threshold and bool(side[k])]


@dataclass
class ScoreInspectionResult:
    """One model's inspection: the per-class scores, AIV, flags, an optional recovered trigger per class,
    its held-out success, per-class extras (reported as ``per_class/<name>``) and the running time."""

    scores: Tensor
    aiv: Tensor
    flagged: list[int]
    seconds: float
    trigger: Trigger | None = None
    success: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


class ScoreInspection(HeldOutShares, Defense):
    """Base of the model inspectors that score every class without the inversion engine.

    Subclasses implement :meth:`score` (tensors: ``score`` ``(K,)``; optionally ``mask``, ``pattern``,
    ``delta`` of a recovered :class:`~bdlab.inversion.engine.Trigger` per class; any other ``(K,)``
    tensor is reported per class) and set ``suspicious`` (``high``, ``low`` or ``both``: on which side
    of the median a backdoor's target lies).

    Args:
        optimisation_images: held-out clean images the method reads (seeds, optimisation, saliency).
        evaluation_images: further held-out images the recovered triggers' success is measured on.
        aiv_threshold: AIV above which a class on the suspicious side is flagged (default 2).
        seed: the method's random draws.
    """

    category = "model_inspection"
    headline_metrics = ModelInspection.headline_metrics
    suspicious = "high"

    def __init__(self, optimisation_images: int, evaluation_images: int, aiv_threshold: float = 2.0,
                 seed: int = 0) -> None:
        check_at_least("defense.optimisation_images", optimisation_images, 1)
        check_at_least("defense.evaluation_images", evaluation_images, 1)
        if not aiv_threshold > 0:
            raise ConfigError("defense.aiv_threshold", f"got {aiv_threshold}, must be > 0")
        self.optimisation_images, self.evaluation_images = int(optimisation_images), int(evaluation_images)
        self.aiv_threshold, self.seed = float(aiv_threshold), int(seed)

    @abstractmethod
    def score(self, model: nn.Module, images: ImageSet, num_classes: int) -> dict[str, Tensor]:
        """The per-class scores of ``model`` from held-out ``images`` (and any recovered triggers)."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The method's settings: part of the cache key of its results."""

    def compute(self, model: nn.Module, images: ImageSet, num_classes: int, cache: ArtifactCache | None = None,
                model_key: str | None = None) -> dict[str, Tensor]:
        """:meth:`score`'s tensors with its running time, from the cache when this inspector already ran
        on this model and these images."""
        def build() -> dict[str, Tensor]:
            started = time.perf_counter()
            tensors = self.score(model, images, num_classes)
            return {**{k: v.detach().cpu() for k, v in tensors.items()},
                    "seconds": torch.tensor(time.perf_counter() - started)}

        if cache is None or model_key is None:
            return build()
        spec = {"model": model_key, "inspector": self.name, "settings": self.settings(), "seed": self.seed,
                "images": hashlib.sha256(images.images.numpy().tobytes()).hexdigest()}
        tensors, _ = cache.get_or_build(f"inspection/{self.name}", spec, build)
        return tensors

    def inspect(self, model: nn.Module, data: DatasetSplits, cache: ArtifactCache | None = None,
                model_key: str | None = None) -> ScoreInspectionResult:
        """Score every class of ``model`` (or load the scores), measure any recovered trigger's held-out
        success, and find the outliers."""
        optimisation, evaluation = self.splits(data)
        tensors = self.compute(model, optimisation, data.num_classes, cache, model_key)
        started = time.perf_counter()
        trigger = Trigger(tensors["mask"], tensors["pattern"], tensors["delta"]) if "mask" in tensors else None
        success = None if trigger is None else holdout_success(model, trigger, evaluation)
        seconds = float(tensors["seconds"]) + time.perf_counter() - started
        scores = tensors["score"].double()
        extras = {k: v for k, v in tensors.items() if k not in ("score", "mask", "pattern", "delta", "seconds")}
        return ScoreInspectionResult(scores, anomaly_index(scores), flagged_by_score(scores, self.aiv_threshold,
                                                                                     self.suspicious),
                                     seconds, trigger, success, extras)

    def run(self, context: RunServices) -> dict[str, Any]:
        # only the inspectors that reverse-engineer a trigger have one to draw
        return inspect_trojan_and_clean(self, context, drawable=lambda inspection: inspection.trigger is not None)

    def model_metrics(self, inspection: ScoreInspectionResult, prefix: str) -> dict[str, Any]:
        """The model's keys: largest AIV on the suspicious side, the flags, ART and the per-class lists."""
        side = suspicious_side(inspection.scores, self.suspicious)
        metrics: dict[str, Any] = {
            f"{prefix}aiv_max": max((float(inspection.aiv[k]) for k in range(len(side)) if side[k]), default=0.0),
            f"{prefix}flagged": len(inspection.flagged),
            f"{prefix}flagged_classes": inspection.flagged,
            f"{prefix}art_s": inspection.seconds,
            f"{prefix}per_class/score": inspection.scores.tolist(),
            f"{prefix}per_class/aiv": inspection.aiv.tolist(),
        }
        if inspection.trigger is not None:
            metrics[f"{prefix}per_class/size"] = inspection.trigger.footprint.flatten(1).sum(1).tolist()
            metrics[f"{prefix}per_class/pixels"] = count_pixels(inspection.trigger).tolist()
            metrics[f"{prefix}per_class/asr"] = inspection.success.tolist()
        for name, values in inspection.extras.items():
            metrics[f"{prefix}per_class/{name}"] = values.tolist()
        return metrics

    def target_metrics(self, inspection: ScoreInspectionResult, attack: Attack) -> dict[str, Any]:
        """The attack's target class: AIV and flag; MLN, MJS, #pixels and held-out ASR of its recovered
        trigger (NaN without an attack, without a trigger, and MJS without a fixed trigger mask)."""
        keys = ("defense/aiv_target", "defense/target_flagged", "defense/mln", "defense/mjs", "defense/pixels",
                "defense/trigger_asr")
        metrics: dict[str, Any] = {key: math.nan for key in keys}
        if isinstance(attack, NoAttack):
            return metrics
        target = attack.target_class
        metrics["defense/aiv_target"] = float(inspection.aiv[target])
        metrics["defense/target_flagged"] = float(target in inspection.flagged)
        trigger = inspection.trigger
        if trigger is not None:
            true_mask = attack.trigger_mask
            metrics["defense/mln"] = float(trigger.footprint[target].sum())
            metrics["defense/mjs"] = math.nan if true_mask is None else \
                mask_jaccard(trigger.footprint[target, 0], true_mask)
            metrics["defense/pixels"] = float(count_pixels(trigger)[target])
            metrics["defense/trigger_asr"] = float(inspection.success[target])
        return metrics

    def draw(self, inspection: ScoreInspectionResult, data: DatasetSplits, path: Path) -> Path:
        """The recovered triggers of every class on a held-out image (:func:`draw_recovered_triggers`)."""
        _, evaluation = self.splits(data)
        return draw_recovered_triggers(inspection.trigger, evaluation, path)
