"""A scan's pictures: the ROC curves of every scanner on one plot (a panel per score), and the scanner x
attack-family detection rates as a heatmap on the fixed 0-100 scale of rates (:mod:`bdlab.reporting.scales`).
Bare ``Figure`` objects (no pyplot): no GUI backend on servers."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from bdlab.reporting.scales import PERCENT
from bdlab.scanning.population import Verdict, roc_auc, roc_curve

DETECTION_TITLE = "Detection rate (%; the clean column: false positives)"


#: (score, panel title) of the ROC panels
ROC_PANELS = (("aiv", "ROC of the largest anomaly index (within a model)"),
              ("score", "ROC of the most suspicious score (across models)"))


def roc_figure(verdicts: Mapping[str, list[Verdict]]) -> Figure:
    """Two panels, each with one ROC curve per scanner (those with both kinds of model and a defined score), its
    AUC in the legend: of ``aiv_max``, and of the most suspicious class's own score (``score_auc``)."""
    figure = Figure(figsize=(10.4, 4.8))
    for axes, (by, title) in zip(figure.subplots(1, 2), ROC_PANELS):
        axes.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="chance (AUC 0.50)")
        for scanner, found in verdicts.items():
            curve = roc_curve(found, by)
            if curve is not None:
                axes.plot(*curve, marker=".", label=f"{scanner} (AUC {roc_auc(found, by):.2f})")
        axes.set_xlim(-0.02, 1.02)
        axes.set_ylim(-0.02, 1.02)
        axes.set_aspect("equal")
        axes.set_xlabel("false-positive rate (clean models flagged)")
        axes.set_ylabel("true-positive rate (trojaned models flagged)")
        axes.set_title(title, fontsize=10)
        axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def detection_figure(rates: Mapping[str, Mapping[str, float]], counts: Mapping[str, int]) -> Figure:
    """Scanners (rows) x attack families (columns, ``n`` models each) of detection rates, on the fixed 0-100 scale;
    a cell without models is grey and says n/a."""
    scanners = list(rates)
    families = list(dict.fromkeys(family for row in rates.values() for family in row))
    values = np.array([[rates[s].get(f, math.nan) for f in families] for s in scanners], dtype=float)
    low, high = PERCENT  # rates share one fixed scale across every scan and report
    figure = Figure(figsize=(2.2 + 1.1 * len(families), 1.3 + 0.5 * len(scanners)))
    axes = figure.subplots()
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    image = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto", vmin=low, vmax=high)
    figure.colorbar(image, ax=axes, label=f"fixed scale {low:g} to {high:g}")
    axes.set_xticks(range(len(families)), [f"{f} (n={counts.get(f, 0)})" for f in families], rotation=30,
                    ha="right")
    axes.set_yticks(range(len(scanners)), scanners)
    axes.set_xlabel("attack family")
    axes.set_ylabel("scanner")
    axes.set_title(DETECTION_TITLE, fontsize=10)
    for i in range(len(scanners)):
        for j in range(len(families)):
            value = values[i, j]
            # viridis is light at its top: dark text there, light text below the middle of the range
            text, colour = ("n/a", "black") if not np.isfinite(value) else \
                (f"{value:.0f}", "black" if (value - low) / (high - low) > 0.5 else "white")
            axes.text(j, i, text, ha="center", va="center", color=colour, fontsize=8)
    figure.tight_layout()
    return figure
