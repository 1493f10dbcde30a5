"""The input-filtering protocol (docs/metrics.md, "Input filtering"; TrojanZoo §5.3.2, Table 10).

A defense gives every incoming input a continuous suspicion score (higher = more suspicious).
The threshold is the score that leaves a share ``fpr`` (default 0.05) of the held-out clean
inputs (the defense split) above it; at that threshold the protocol reports, under stable
keys (rates in percent like every rate of :mod:`bdlab.metrics`, ROC-AUC in [0, 1]):

- ``defense/tpr``: flagged share of the poisoned test inputs;
- ``defense/fpr``: flagged share of the clean *test* inputs (the threshold never saw them);
- ``defense/roc_auc``: from the scores of clean vs poisoned test inputs (torchmetrics);
- ``defense/asr_after_rejection``: share of poisoned inputs that are *not* flagged *and* reach
  the target (a rejected input is a failed attack);
- ``defense/acc_after_rejection`` and ``defense/acc_cost``: clean accuracy when rejected clean
  inputs count as errors, and the drop from the model's accuracy on the same inputs;
- ``defense/threshold`` and ``defense/time_per_input_ms`` (scoring time only).

The score histograms of clean vs poisoned test inputs go to ``score_histogram.png`` in the
run directory, and to W&B when a WandbLogger is active.
"""

from __future__ import annotations

import logging
import math
import time
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.loggers import WandbLogger
from torch import Tensor
from torchmetrics.functional.classification import binary_auroc

from bdlab.defenses.base import ART_INPUT, TPR, Defense, Residual
from bdlab.errors import ConfigError, check_range
from bdlab.evaluate import evaluate
from bdlab.metrics import percent
from bdlab.services import RunServices

log = logging.getLogger(__name__)

HISTOGRAM_FILE = "score_histogram.png"
#: held-out clean scores wanted above the threshold: with fewer, the FPR it is set to is a coarse estimate
MIN_ABOVE_THRESHOLD = 10


def check_held_out_size(held_out: int, fpr: float, name: str) -> None:
    """Warn when ``held_out`` clean scores are too few to resolve ``fpr``: the threshold leaves
    ``floor(fpr * n)`` of them above it, and below :data:`MIN_ABOVE_THRESHOLD` the FPR reached on new inputs
    can be far from the target (below ``1 / fpr`` it is the largest score, a target of 0%)."""
    needed = math.ceil(MIN_ABOVE_THRESHOLD / fpr)
    if held_out < needed:
        log.warning("%s: the held-out clean split has %d images, so the %g%% FPR threshold rests on %d of them; "
                    "the FPR on test inputs may be far from %g%%: raise dataset.defense_fraction to hold out at "
                    "least %d", name, held_out, 100 * fpr, math.floor(fpr * held_out), 100 * fpr, needed)


def threshold_at_fpr(clean_scores: Tensor, fpr: float) -> float:
    """The smallest order statistic of ``clean_scores`` that leaves at most ``floor(fpr * n)`` scores
    strictly above it (inputs are flagged when ``score > threshold``)."""
    if len(clean_scores) == 0:
        raise ValueError("no held-out clean scores to set the threshold on")
    ordered = clean_scores.double().sort().values
    index = max(0, math.ceil(len(ordered) * (1.0 - fpr)) - 1)
    return float(ordered[index])


def roc_auc(clean_scores: Tensor, poisoned_scores: Tensor) -> float:
    """ROC-AUC of telling poisoned (positive) from clean inputs by their continuous scores."""
    if len(clean_scores) == 0 or len(poisoned_scores) == 0:
        return math.nan
    scores = torch.cat([clean_scores, poisoned_scores]).double()
    # torchmetrics squashes scores outside [0, 1] with a sigmoid, which saturates into ties for
    # large scores; dense ranks scaled to [0, 1] keep the order and the ties (AUC is rank-based)
    unique, ranks = torch.unique(scores, return_inverse=True)
    scores = ranks.double() / max(len(unique) - 1, 1)
    targets = torch.cat([torch.zeros(len(clean_scores)), torch.ones(len(poisoned_scores))]).long()
    return float(binary_auroc(scores, targets))


def save_histogram(path: Path, clean: Tensor, poisoned: Tensor | None, threshold: float, title: str) -> Path:
    """Overlaid score histograms of clean and poisoned inputs with the threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    values = [clean] if poisoned is None else [clean, poisoned]
    low = min(float(v.min()) for v in values if len(v))
    high = max(float(v.max()) for v in values if len(v))
    bins = torch.linspace(low, high if high > low else low + 1.0, 51).tolist()
    axis.hist(clean.numpy(), bins=bins, alpha=0.6, density=True, label=f"clean ({len(clean)})")
    if poisoned is not None and len(poisoned):
        axis.hist(poisoned.numpy(), bins=bins, alpha=0.6, density=True, label=f"poisoned ({len(poisoned)})")
    axis.axvline(threshold, color="black", linestyle="--", label="threshold")
    axis.set_xlabel("suspicion score (higher = more suspicious)")
    axis.set_ylabel("density")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def subsample(count: int, limit: int | None, seed: int) -> Tensor:
    """Sorted seeded indices of at most ``limit`` of ``count`` items (all when ``limit`` is None)."""
    if limit is None or count <= limit:
        return torch.arange(count)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(count, generator=generator)[:limit].sort().values


def detection_rates(clean_flags: Tensor, clean_scores: Tensor, poisoned_flags: Tensor | None = None,
                    poisoned_scores: Tensor | None = None, prefix: str = "defense/") -> dict[str, float]:
    """``{prefix}fpr`` (flagged share of clean inputs, %) and, with poisoned inputs, ``{prefix}tpr`` (their
    flagged share, %) and ``{prefix}roc_auc`` (:func:`roc_auc` of the scores): what both filtering
    protocols report, on inputs here and on training samples in data filtering."""
    rates = {f"{prefix}fpr": percent(clean_flags)}
    if poisoned_flags is not None and poisoned_scores is not None:
        rates.update({f"{prefix}tpr": percent(poisoned_flags), f"{prefix}roc_auc": roc_auc(clean_scores,
                                                                                          poisoned_scores)})
    return rates


def check_filter_settings(fpr: float, max_inputs: int | None) -> None:
    """Refuse an ``fpr`` outside (0, 1) or a ``max_inputs`` below 1 (null = all)."""
    check_range("defense.fpr", fpr, 0.0, 1.0, low_open=True, high_open=True)
    if max_inputs is not None and max_inputs < 1:
        raise ConfigError("defense.max_inputs", f"got {max_inputs}, must be >= 1 or null (all)")


def filter_inputs(context: RunServices, scores: Callable[[RunServices, Tensor], Tensor], fpr: float,
                  max_inputs: int | None, seed: int, name: str) -> dict[str, Any]:
    """The protocol of this module for any scoring function ``scores(context, uint8 images)``: the
    held-out clean, clean test and poisoned test inputs are scored in one call, in that order (defenses
    that compare inputs with each other see the whole stream); the threshold is set on the held-out
    scores at ``fpr``; clean and poisoned test inputs are at most ``max_inputs`` each (seeded by ``seed``)."""
    model, target = context.trojan_model(), context.attack.target_class
    clean = context.data.test.subset(subsample(len(context.data.test), max_inputs, seed))
    poisoned = context.poisoned_test
    if poisoned is not None:
        poisoned = poisoned.subset(subsample(len(poisoned), max_inputs, seed + 1))
    parts = [context.data.defense.images, clean.images] + ([poisoned.images] if poisoned is not None else [])
    check_held_out_size(len(context.data.defense), fpr, name)
    log.info("%s: scoring %d inputs: %s", name, sum(map(len, parts)), ", ".join(
        f"{len(part)} {kind}" for part, kind in zip(parts, ("held-out clean", "clean test", "poisoned test"))))
    started = time.perf_counter()
    all_scores = scores(context, torch.cat(parts)).float().cpu()
    elapsed = time.perf_counter() - started
    held_scores, clean_scores, *rest = all_scores.split([len(part) for part in parts])
    poisoned_scores = rest[0] if rest else None
    threshold = threshold_at_fpr(held_scores, fpr)
    clean_flags = clean_scores > threshold
    predicted = evaluate(model, clean, poisoned, target)
    clean_correct = predicted.clean_logits.argmax(1) == clean.labels
    poisoned_flags = None if poisoned_scores is None else poisoned_scores > threshold
    metrics: dict[str, Any] = {
        "defense/threshold": threshold,
        **detection_rates(clean_flags, clean_scores, poisoned_flags, poisoned_scores),
        "defense/acc_after_rejection": percent(clean_correct & ~clean_flags),
        "defense/acc_cost": percent(clean_correct) - percent(clean_correct & ~clean_flags),
        "defense/time_per_input_ms": 1000.0 * elapsed / len(all_scores),
    }
    if poisoned_flags is not None:
        hits = predicted.poisoned_logits.argmax(1) == target
        metrics["defense/asr_after_rejection"] = percent(hits & ~poisoned_flags)
    title = f"{name} vs {context.attack.display_name} on {context.data.name}"
    path = save_histogram(Path(context.output_dir) / HISTOGRAM_FILE, clean_scores, poisoned_scores, threshold, title)
    for logger in context.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key="defense/score_histogram", images=[str(path)])
    return metrics


#: the headline metrics of an input filter (also of a data filter in ``inference`` mode)
FILTER_METRICS = (TPR, ("defense/fpr", "Input filtering: FPR (%)"), ("defense/roc_auc", "Input filtering: ROC-AUC"),
                  ART_INPUT)
#: what answers "does it work" for a filter of inputs (also a data filter in ``inference`` mode)
FILTER_RESIDUAL = Residual("ASR after rejection (a flagged poisoned input is a failed attack)",
                           asr="defense/asr_after_rejection", cost="defense/acc_cost")


class InputFilteringDefense(Defense):
    """Base of input-filtering defenses: subclasses implement :meth:`scores`; :meth:`run` applies the
    protocol of this module (:func:`filter_inputs`: threshold at ``fpr`` on the held-out clean split).

    Args:
        fpr: false-positive rate the threshold is set to on held-out clean inputs, in (0, 1)
            (default 0.05, TrojanZoo §5.3.2).
        max_inputs: evaluate on at most this many clean and this many poisoned test inputs
            (a seeded subset; null = all). The defense split is always scored in full.
        seed: seeds the subsets and any randomness of the defense.
    """

    category = "input_filtering"
    headline_metrics = FILTER_METRICS
    residual = FILTER_RESIDUAL

    def __init__(self, fpr: float = 0.05, max_inputs: int | None = None, seed: int = 0) -> None:
        check_filter_settings(fpr, max_inputs)
        self.fpr, self.max_inputs, self.seed = fpr, max_inputs, seed

    @abstractmethod
    def scores(self, context: RunServices, images: Tensor) -> Tensor:
        """Suspicion scores (float, CPU, one per image) of uint8 ``images``; higher = more suspicious."""

    def run(self, context: RunServices) -> dict[str, Any]:
        return filter_inputs(context, self.scores, self.fpr, self.max_inputs, self.seed, self.name)
