"""A scanner's figures over a population of models, from its verdicts (pure functions; docs/scanning.md).

A scanner *calls* a model trojaned when it flags a class. For most scanners that is the model's largest anomaly
index on the scanner's suspicious side (``aiv_max``) above its ``aiv_threshold`` (2, Neural Cleanse's rule, Wang et
al. S&P 2019 §IV-C); a scanner with a criterion of its own besides (ABS: REASR >= 50%) flags fewer. Over the
models whose ground truth is known and whose scan succeeded, per scanner:

- ``accuracy``: % of models called correctly (trojaned as trojaned, clean as clean);
- ``tpr``: % of trojaned models called trojaned; ``fpr``: % of clean models called trojaned;
- ``auc``: ROC-AUC of ``aiv_max`` as the score of "trojaned" (torchmetrics' binary AUROC, ties counted half);
- ``score_auc``: ROC-AUC of ``top_score``, the most suspicious class's own score (the smallest trigger, the highest
  REASR), compared *across* models: a population threshold on the trigger size, as K-Arm and TrojAI's scanners
  decide, in place of the within-model AIV. Meaningful only among models of one architecture and dataset; NaN for
  a two-sided scanner (NeuronInspect), whose score has no suspicious direction;
- ``score_accuracy``: detection accuracy (%) of a threshold on that score, calibrated leave-one-out: each model is
  judged by the threshold that is most accurate on all the *other* models (K-Arm tunes its trigger-size bound on
  TrojAI's training round the same way; leave-one-out keeps the model judged out of its own threshold);
- ``target_flagged``: % of the trojaned models with a known target whose true target is among the flagged classes;
- ``mean_s``, ``median_s``: seconds per model (as measured when it was scanned, also when cached), and
  ``models_per_hour`` (3600 / ``mean_s``);
- counts: ``n_models``, ``n_failed``, ``n_trojaned``, ``n_clean``, ``n_unknown`` (scanned, ground truth unknown).

Failed scans are counted and left out of every rate. A figure without the models it needs (no trojaned model for
the TPR, only one kind of model for the AUC, no ground truth at all) is NaN, never 0. These are the figures of
K-Arm (Shen et al., ICML 2021, Tables 1-2) and the Pixel paper (§5.5, Table 8) on TrojAI's rounds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torchmetrics.functional.classification import binary_auroc, binary_roc

OK, FAILED = "ok", "failed"
UNKNOWN_FAMILY = "unknown"


@dataclass
class Verdict:
    """One scanner's verdict on one model, with the model's ground truth (None where unknown).

    ``flagged_classes`` are the classes the scanner flags (AIV above ``aiv_threshold`` on the suspicious side, and
    the scanner's own criterion where it has one, as ABS's REASR >= 50%); ``aiv_max`` is
    the largest AIV on that side; ``anomalous_class`` is that class and ``anomalous_score`` the scanner's score of
    it; ``target_aiv`` is the true target's AIV, signed (negative where the target is off the suspicious side, as a
    target whose trigger came out larger than the median; NaN without a known target); ``seconds`` is the scan's
    running time. ``top_score`` is the most suspicious class's score (the smallest on the ``low`` side, the
    largest on the ``high`` side; NaN for a ``both``-sided scanner) and ``suspicious`` that side. A failed scan
    has ``status`` ``failed``, its ``error``, and NaN figures.
    """

    name: str
    scanner: str
    status: str = OK
    error: str = ""
    flagged_classes: list[int] = field(default_factory=list)
    aiv_max: float = math.nan
    anomalous_class: int | None = None
    anomalous_score: float = math.nan
    target_aiv: float = math.nan
    top_score: float = math.nan
    suspicious: str = ""
    aiv_threshold: float = 2.0
    seconds: float = math.nan
    cached: bool | None = None
    trojaned: bool | None = None
    target_class: int | None = None
    family: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def called(self) -> bool:
        """Whether the scanner calls the model trojaned: it flags a class. Not ``aiv_max > aiv_threshold``: ABS
        also needs the class's REASR to reach 50%, and a model it flags nothing in is not called."""
        return bool(self.flagged_classes)

    @property
    def suspicion(self) -> float:
        """``top_score`` oriented so that larger is more suspicious (a smaller trigger, a higher REASR)."""
        return -self.top_score if self.suspicious == "low" else self.top_score if self.suspicious == "high" \
            else math.nan

    @property
    def target_flagged(self) -> bool | None:
        """Whether the true target is flagged; None unless the model is trojaned with a known target."""
        if not self.ok or not self.trojaned or self.target_class is None:
            return None
        return self.target_class in self.flagged_classes


def percent(hits: int, count: int) -> float:
    """``100 hits / count``; NaN for no models."""
    return 100.0 * hits / count if count else math.nan


def ranked(scores: Sequence[float]) -> torch.Tensor:
    """Scores mapped to [0, 1] by rank, ties kept tied: torchmetrics passes scores outside [0, 1] through a
    sigmoid, which rounds AIVs above ~17 (and infinite ones) to the same 1.0 and so would tie them; ranks keep
    every order, hence the same ROC curve and AUC."""
    values = sorted(set(scores))
    if len(values) == 1:
        return torch.full((len(scores),), 0.5, dtype=torch.float64)
    rank = {value: i / (len(values) - 1) for i, value in enumerate(values)}
    return torch.tensor([rank[score] for score in scores], dtype=torch.float64)


def scored(verdicts: Iterable[Verdict], by: str = "aiv") -> tuple[list[float], list[int]]:
    """The scores (``by``: ``aiv`` for ``aiv_max``, ``score`` for :attr:`Verdict.suspicion`) and truths (1 trojaned,
    0 clean) of the successful verdicts with ground truth."""
    known = [v for v in verdicts if v.ok and v.trojaned is not None]
    scores = [v.aiv_max if by == "aiv" else v.suspicion for v in known]
    return scores, [int(bool(v.trojaned)) for v in known]


def rankable(scores: Sequence[float], truth: Sequence[int]) -> bool:
    """Whether the models can be ranked by these scores: both kinds of model are present, every score defined."""
    return len(set(truth)) == 2 and not any(math.isnan(score) for score in scores)


def roc_auc(verdicts: Iterable[Verdict], by: str = "aiv") -> float:
    """ROC-AUC of the ``by`` score (:func:`scored`; trojaned is the positive class); NaN unless
    :func:`rankable`."""
    scores, truth = scored(verdicts, by)
    if not rankable(scores, truth):
        return math.nan
    return float(binary_auroc(ranked(scores), torch.tensor(truth)))


def roc_curve(verdicts: Iterable[Verdict], by: str = "aiv") -> tuple[list[float], list[float]] | None:
    """The ROC curve of the ``by`` score as (FPR, TPR) points in [0, 1]; None where :func:`roc_auc` is NaN."""
    scores, truth = scored(verdicts, by)
    if not rankable(scores, truth):
        return None
    fpr, tpr, _ = binary_roc(ranked(scores), torch.tensor(truth))
    return fpr.tolist(), tpr.tolist()


def best_threshold(scores: torch.Tensor, truth: torch.Tensor) -> float:
    """The threshold ``t`` whose rule "trojaned when score > t" is most accurate on these models, half-way between
    the two scores it separates (the lowest such cut on a tie), from the sorted scores' cumulative counts."""
    values, order = torch.sort(scores)
    labels = truth[order]
    # calling every model from place i on trojaned: right are the clean ones before i and the trojaned ones from i
    clean_before = torch.cat([torch.zeros(1, dtype=labels.dtype), torch.cumsum(1 - labels, 0)])
    trojaned_from = torch.cat([torch.cumsum(labels.flip(0), 0).flip(0), torch.zeros(1, dtype=labels.dtype)])
    right = clean_before + trojaned_from
    distinct = torch.cat([torch.tensor([True]), values[1:] != values[:-1], torch.tensor([True])])
    place = int(torch.argmax(torch.where(distinct, right, torch.full_like(right, -1.0))))  # a cut between values
    if place == 0:
        return -math.inf
    below = float(values[place - 1])
    if place == len(values):
        return below
    above = float(values[place])
    return below + (above - below) / 2 if math.isfinite(below) and math.isfinite(above) else below


def calibrated_accuracy(verdicts: Iterable[Verdict]) -> float:
    """Leave-one-out detection accuracy (%) of a threshold on :attr:`Verdict.suspicion` (``score_accuracy``); NaN
    unless :func:`rankable`."""
    scores, truth = scored(verdicts, "score")
    if not rankable(scores, truth):
        return math.nan
    values, labels = torch.tensor(scores, dtype=torch.float64), torch.tensor(truth, dtype=torch.float64)
    keep = torch.ones(len(truth), dtype=torch.bool)
    right = 0
    for i in range(len(truth)):
        keep[i] = False
        threshold = best_threshold(values[keep], labels[keep])
        keep[i] = True
        right += int(bool(values[i] > threshold) == bool(truth[i]))
    return percent(right, len(truth))


def population_metrics(verdicts: Sequence[Verdict]) -> dict[str, float | int]:
    """One scanner's figures over a population (see the module docstring)."""
    ok = [v for v in verdicts if v.ok]
    trojaned = [v for v in ok if v.trojaned is True]
    clean = [v for v in ok if v.trojaned is False]
    with_target = [v.target_flagged for v in trojaned if v.target_flagged is not None]
    seconds = [v.seconds for v in ok if math.isfinite(v.seconds)]
    mean_s = statistics.fmean(seconds) if seconds else math.nan
    return {
        "accuracy": percent(sum(v.called for v in trojaned) + sum(not v.called for v in clean),
                            len(trojaned) + len(clean)),
        "tpr": percent(sum(v.called for v in trojaned), len(trojaned)),
        "fpr": percent(sum(v.called for v in clean), len(clean)),
        "auc": roc_auc(ok),
        "score_auc": roc_auc(ok, by="score"),
        "score_accuracy": calibrated_accuracy(ok),
        "target_flagged": percent(sum(with_target), len(with_target)),
        "mean_s": mean_s,
        "median_s": statistics.median(seconds) if seconds else math.nan,
        "models_per_hour": 3600.0 / mean_s if mean_s > 0 else math.nan,
        "n_models": len(verdicts),
        "n_failed": len(verdicts) - len(ok),
        "n_trojaned": len(trojaned),
        "n_clean": len(clean),
        "n_unknown": len(ok) - len(trojaned) - len(clean),
    }


def family_of(verdict: Verdict) -> str:
    """The label of a model's family: its own, else ``clean`` for a clean model, else ``unknown``."""
    return verdict.family or ("clean" if verdict.trojaned is False else UNKNOWN_FAMILY)


def detection_rates(verdicts: Iterable[Verdict]) -> dict[str, float]:
    """Per attack family, % of its models (scanned, ground truth known) the scanner calls trojaned: the detection
    rate of a trojaned family, the false-positive rate of the clean one."""
    counts: dict[str, list[int]] = {}
    for verdict in verdicts:
        if verdict.ok and verdict.trojaned is not None:
            hits = counts.setdefault(family_of(verdict), [0, 0])
            hits[0] += verdict.called
            hits[1] += 1
    return {family: percent(*counts[family]) for family in sorted(counts, key=lambda f: (f == "clean", f))}


def by_scanner(verdicts: Iterable[Verdict]) -> dict[str, list[Verdict]]:
    """The verdicts of each scanner, in the order the scanners first appear."""
    grouped: dict[str, list[Verdict]] = {}
    for verdict in verdicts:
        grouped.setdefault(verdict.scanner, []).append(verdict)
    return grouped


def has_ground_truth(verdicts: Iterable[Verdict]) -> bool:
    """Whether any model's ground truth is known."""
    return any(v.trojaned is not None for v in verdicts)
