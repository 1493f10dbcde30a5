"""The model-inspection protocol (DESIGN.md "model inspection"; TrojanZoo §5.3.3, Tables 11-13).

An inspector recovers one trigger per class of a model from held-out clean images and scores the
classes: a class whose trigger is abnormally small is where a backdoor leads. The protocol runs
on the trojaned model and on the clean reference (false positives) and reports, for each:

- per class: the recovered trigger's size (mask L1 norm or #pixels, the inspector's), its
  attack success on held-out images *not* used for the optimisation, the final loss, and the
  anomaly index (AIV, :func:`anomaly_index`);
- the flagged classes: AIV > ``aiv_threshold`` (2) on the small-trigger side;
- for the attack's target class: its AIV, whether it is flagged, MLN (the L1 norm of its
  recovered footprint), MJS against the attack's true trigger mask (:func:`mask_jaccard`; not
  applicable, NaN, for attacks without a fixed trigger mask), #pixels (:func:`count_pixels`), and
  its held-out attack success;
- ART, the inspection's running time per model.

Keys (trojaned model): ``defense/aiv_target``, ``defense/aiv_max``, ``defense/target_flagged``
(1 or 0), ``defense/flagged`` (count) and ``defense/flagged_classes``, ``defense/mln``,
``defense/mjs``, ``defense/pixels``, ``defense/trigger_asr``, ``defense/trigger_loss``,
``defense/art_s`` and per-class lists ``defense/per_class/{size,pixels,aiv,asr,loss}``; the clean
reference's under ``defense/clean_...``. The recovered triggers are cached under
``inspection/<name>/`` (keyed by the model's key, the inspector's settings and the images) for
defenses that name the inspector (unlearning), and drawn in ``inspection_<model>.png``.
"""

from __future__ import annotations

import hashlib
import math
import time
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.utils import save_image

from bdlab.attacks.base import Attack, NoAttack
from bdlab.cache import ArtifactCache
from bdlab.datasets.base import DatasetSplits, ImageSet, to_float
from bdlab.defenses.base import AIV, ART_MODEL, MJS, MLN, Defense
from bdlab.errors import ConfigError, check_at_least
from bdlab.evaluate import predict_logits
from bdlab.inversion.engine import EpochScheduler, InversionEngine, InversionMethod, InversionResult, Schedule, Trigger
from bdlab.inversion.methods import LEVEL, changed_pixels
from bdlab.metrics import percent
from bdlab.services import RunServices

MAD_SCALE = 1.4826


def median(values: Tensor) -> Tensor:
    """The median; of an even count, the mean of the two middle values (torch.median takes the lower)."""
    ordered = values.double().sort().values
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def anomaly_index(sizes: Tensor) -> Tensor:
    """Neural Cleanse's anomaly index per class: ``|s - median| / (1.4826 MAD)``, MAD the median absolute
    deviation (both medians of an even count the mean of the two middle values). With MAD 0 a size off
    the median is infinitely anomalous and one on it is not."""
    sizes = sizes.double()
    centre = median(sizes)
    deviation = (sizes - centre).abs()
    mad = median(deviation) * MAD_SCALE
    if mad == 0:
        return torch.where(deviation > 0, torch.full_like(sizes, math.inf), torch.zeros_like(sizes))
    return deviation / mad


def flagged_classes(sizes: Tensor, threshold: float = 2.0) -> list[int]:
    """Classes whose trigger is abnormally *small*: AIV above ``threshold`` and size below the median."""
    aiv = anomaly_index(sizes)
    return [k for k in range(len(sizes)) if aiv[k] > threshold and sizes[k] < median(sizes)]


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


@dataclass
class Inspection:
    """One model's inspection: the inversion result, the held-out success per class, AIV and the flags."""

    result: InversionResult
    holdout_success: Tensor
    aiv: Tensor
    flagged: list[int]
    seconds: float

    @property
    def sizes(self) -> Tensor:
        return self.result.size


def holdout_success(model: nn.Module, trigger: Trigger, images: ImageSet) -> Tensor:
    """Per class ``k``: percent of the held-out images not of class ``k`` that its trigger sends to ``k``."""
    rates = []
    for k in range(len(trigger.mask)):
        keep = images.labels != k
        predicted = predict_logits(model, images.images[keep], lambda x, k=k: trigger.stamp(x, k)).argmax(1)
        rates.append(percent(predicted == k))
    return torch.tensor(rates)


class HeldOutShares:
    """The held-out split as both inspection families read it: the first ``optimisation_images`` images
    for the method, the next ``evaluation_images`` (disjoint) to measure what it recovers."""

    optimisation_images: int
    evaluation_images: int

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


class ModelInspection(HeldOutShares, Defense):
    """Base of the model-inspection defenses: subclasses give the inversion method (and a scheduler).

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

    def __init__(self, epochs: int = 100, batch_size: int = 32, lr: float | None = None, threshold: float = 0.99,
                 init_weight: float = 1e-3, up: float = 1.5, down: float = 1.5 ** 1.5, patience: int = 5,
                 early_stop_patience: int = 25, mode: str = "batched", restarts: int = 1, optimisation_images: int = 300,
                 evaluation_images: int = 200, aiv_threshold: float = 2.0, seed: int = 0) -> None:
        check_at_least("defense.optimisation_images", optimisation_images, 1)
        check_at_least("defense.evaluation_images", evaluation_images, 1)
        if not aiv_threshold > 0:
            raise ConfigError("defense.aiv_threshold", f"got {aiv_threshold}, must be > 0")
        schedule = Schedule(init_weight, up, down, patience, early_stop_patience)
        self.engine = InversionEngine(self.method(), epochs, batch_size, lr, threshold, schedule, mode, seed, restarts)
        self.settings = {"epochs": epochs, "batch_size": batch_size, "lr": self.engine.lr, "threshold": threshold,
                         "schedule": [init_weight, up, down, patience, early_stop_patience], "mode": mode,
                         "seed": seed, **self.method_settings()}
        if restarts > 1:  # only then, so triggers recovered before the option keep their cache key
            self.settings["restarts"] = restarts
        self.optimisation_images, self.evaluation_images = int(optimisation_images), int(evaluation_images)
        self.aiv_threshold = float(aiv_threshold)

    @abstractmethod
    def method(self) -> InversionMethod:
        """The inversion method this inspector runs on the engine."""

    def method_settings(self) -> dict[str, Any]:
        """The method's own settings, part of the recovered triggers' cache key."""
        return {}

    def scheduler(self) -> EpochScheduler | None:
        """Which classes each epoch optimises (default: every live class)."""
        return None

    def recover(self, model: nn.Module, images: ImageSet, num_classes: int, cache: ArtifactCache | None = None,
                model_key: str | None = None) -> InversionResult:
        """The recovered triggers of every class of ``model``: from the cache when this inspector already
        inverted this model on these images, else optimised now and stored."""
        def build() -> dict[str, Tensor]:
            result = self.engine.run(model, to_float(images.images), images.labels, list(range(num_classes)),
                                     scheduler=self.scheduler())
            return {"mask": result.trigger.mask, "pattern": result.trigger.pattern, "delta": result.trigger.delta,
                    "size": result.size, "success": result.success, "loss": result.loss,
                    "epochs": result.epochs, "reached": result.reached, "seconds": torch.tensor(result.seconds)}

        if cache is None or model_key is None:
            tensors = build()
        else:
            spec = {"model": model_key, "inspector": self.name, "settings": self.settings,
                    "images": hashlib.sha256(images.images.numpy().tobytes()).hexdigest()}
            tensors, _ = cache.get_or_build(f"inspection/{self.name}", spec, build)
        return InversionResult(list(range(num_classes)), Trigger(tensors["mask"], tensors["pattern"], tensors["delta"]),
                               tensors["size"], tensors["success"], tensors["loss"], tensors["epochs"],
                               tensors["reached"], float(tensors["seconds"]))

    def inspect(self, model: nn.Module, data: DatasetSplits, cache: ArtifactCache | None = None,
                model_key: str | None = None) -> Inspection:
        """Recover every class's trigger (or load it), measure its held-out success, score the sizes.
        The running time is the inversion's (as measured when it ran, also on a cache hit) plus the
        held-out evaluation's."""
        optimisation, evaluation = self.splits(data)
        result = self.recover(model, optimisation, data.num_classes, cache, model_key)
        started = time.perf_counter()
        success = holdout_success(model, result.trigger, evaluation)
        seconds = result.seconds + time.perf_counter() - started
        return Inspection(result, success, anomaly_index(result.size), flagged_classes(result.size, self.aiv_threshold),
                          seconds)

    def run(self, context: RunServices) -> dict[str, Any]:
        return inspect_trojan_and_clean(self, context)

    def model_metrics(self, inspection: Inspection, prefix: str) -> dict[str, Any]:
        small_side = [float(inspection.aiv[k]) for k in range(len(inspection.aiv))
                      if inspection.sizes[k] < median(inspection.sizes)]
        return {
            f"{prefix}aiv_max": max(small_side, default=0.0),
            f"{prefix}flagged": len(inspection.flagged),
            f"{prefix}flagged_classes": inspection.flagged,
            f"{prefix}art_s": inspection.seconds,
            f"{prefix}per_class/size": inspection.sizes.tolist(),
            f"{prefix}per_class/pixels": count_pixels(inspection.result.trigger).tolist(),
            f"{prefix}per_class/aiv": inspection.aiv.tolist(),
            f"{prefix}per_class/asr": inspection.holdout_success.tolist(),
            f"{prefix}per_class/loss": inspection.result.loss.tolist(),
        }

    def target_metrics(self, inspection: Inspection, attack: Attack) -> dict[str, Any]:
        """The attack's target class: its AIV, flag, MLN, MJS, #pixels and held-out success (NaN, not
        applicable, without an attack; MJS also for attacks without a fixed trigger mask)."""
        if isinstance(attack, NoAttack):
            return {key: math.nan for key in ("defense/aiv_target", "defense/target_flagged", "defense/mln",
                                              "defense/mjs", "defense/pixels", "defense/trigger_asr",
                                              "defense/trigger_loss")}
        target, trigger = attack.target_class, inspection.result.trigger
        true_mask = attack.trigger_mask
        return {
            "defense/aiv_target": float(inspection.aiv[target]),
            "defense/target_flagged": float(target in inspection.flagged),
            "defense/mln": float(trigger.footprint[target].sum()),
            "defense/mjs": math.nan if true_mask is None else mask_jaccard(trigger.footprint[target, 0], true_mask),
            "defense/pixels": float(count_pixels(trigger)[target]),
            "defense/trigger_asr": float(inspection.holdout_success[target]),
            "defense/trigger_loss": float(inspection.result.loss[target]),
        }

    def draw(self, inspection: Inspection, data: DatasetSplits, path: Path) -> Path:
        """The recovered triggers of every class on a held-out image (:func:`draw_recovered_triggers`)."""
        _, evaluation = self.splits(data)
        return draw_recovered_triggers(inspection.result.trigger, evaluation, path)


def draw_recovered_triggers(trigger: Trigger, images: ImageSet, path: Path) -> Path:
    """One column per class: the recovered footprint (max-normalised) over the trigger stamped on the
    first of ``images``, 3x enlarged, written as a PNG grid to ``path``."""
    image = to_float(images.images[:1])
    footprint = trigger.footprint / trigger.footprint.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None]
    stamped = torch.cat([trigger.stamp(image, k) for k in range(len(trigger.mask))])
    rows = torch.cat([footprint.expand(-1, stamped.shape[1], -1, -1), stamped])
    rows = torch.nn.functional.interpolate(rows, scale_factor=3, mode="nearest")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(rows, str(path), nrow=len(trigger.mask), padding=2, pad_value=0.5)
    return path


def inspect_trojan_and_clean(defense: Any, context: RunServices, drawable: Callable[[Any], bool] = lambda _: True,
                             ) -> dict[str, Any]:
    """The inspection protocol's run, shared by every model-inspection defense: inspect the trojaned model
    and the clean reference (the same model when there is no attack), report both under `defense/` and
    `defense/clean_` with the target's metrics, and draw each inspection that `drawable` accepts."""
    attack, data = context.attack, context.data
    trojan = defense.inspect(context.trojan_model(), data, context.cache, context.trojan_key())
    clean = trojan if isinstance(attack, NoAttack) else \
        defense.inspect(context.clean_model(), data, context.cache, context.clean_key())
    metrics = defense.model_metrics(trojan, "defense/")
    metrics.update(defense.model_metrics(clean, "defense/clean_"))
    metrics.update(defense.target_metrics(trojan, attack))
    for name, inspection in (("trojan", trojan), ("clean", clean)):
        if drawable(inspection):
            defense.draw(inspection, data, Path(context.output_dir) / f"inspection_{name}.png")
    return metrics
