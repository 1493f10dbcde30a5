"""The fixed colour range of each metric's heatmap, all in one place: a colour means the same value in every
grid and every report, never "this grid's minimum" or "its maximum".

- rates and accuracies in percent (ACC, ASR, TPR, FPR, the ASR after rejection, bit accuracy): 0 to 100;
- differences of two percentages, in points (CAD, ARD, the clean-accuracy cost): -100 to 100;
- shares and indices in [0, 1] (ROC-AUC, MJS, NSR, SSIM, CCC, TMC, a flagged-or-not verdict): 0 to 1;
- anything else has no natural bounds (seconds, anomaly indices, norms, dB, pixel counts): the grid's own
  range, and the colour bar says so.

The kind is read from the declared title first ("(%" for percent, "points" for differences), then from the
last part of the key, so a title-less metric of an old results file is scaled the same.
"""

from __future__ import annotations

PERCENT, POINTS, UNIT = (0.0, 100.0), (-100.0, 100.0), (0.0, 1.0)
# words of a key's last part (``defense/asr_after_rejection`` -> asr, after, rejection), by kind; checked in
# this order, so ``acc_cost`` is a cost in points, not an accuracy
_KINDS = ((POINTS, {"cad", "ard", "cost"}),
          (PERCENT, {"acc", "asr", "tpr", "fpr", "rejection", "accuracy", "share"}),
          (UNIT, {"auc", "mjs", "nsr", "ssim", "ccc", "tmc", "target_flagged"}))


def colour_range(metric: str, title: str = "") -> tuple[float, float] | None:
    """The fixed (low, high) colour range of ``metric``, None when it has no natural bounds."""
    if "(%" in title:
        return PERCENT
    if "points" in title:
        return POINTS
    leaf = metric.rsplit("/", 1)[-1]
    words = set(leaf.split("_")) | {leaf}
    for scale, kinds in _KINDS:
        if words & kinds:
            return scale
    return None
