"""The efficacy-specificity trade-off (TrojanZoo, section 5.2.2) when the poisoning rate was swept.

Each poisoning rate gives a trojaned model with a CAD (specificity cost) and an ASR (efficacy).
As in the paper, points with CAD above 3 points are dropped (the attack is bounded to CAD <= 3%),
then both measures are min-max normalised to [0, 1]. The AUC is bdlab's metric (docs/metrics.md):
the area under normalised ASR as a function of normalised CAD, by the trapezoidal rule over
the points sorted by CAD. For a curve rising from (0, 0) to (1, 1) this is 1 minus the area
under the paper's Figure 5 reading (CAD against ASR), so here a *larger* AUC means a stronger
"leverage" effect: more ASR bought per point of CAD.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

from bdlab.reporting.grid import Labelled
from bdlab.reporting.tables import slug

CAD_BOUND = 3.0


@dataclass
class Curve:
    """One attack's trade-off in one setting: raw and normalised points, sorted by CAD, and the AUC."""

    setting: str
    attack: str
    rates: list[float]
    cad: list[float]
    asr: list[float]
    cad_norm: list[float]
    asr_norm: list[float]
    auc: float | None
    note: str = ""


def _normalise(values: list[float]) -> list[float] | None:
    low, high = min(values), max(values)
    return None if high == low else [(v - low) / (high - low) for v in values]


def trapezoid(x: list[float], y: list[float]) -> float:
    return sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1))


def curves(labelled: list[Labelled]) -> list[Curve]:
    """A curve for every (setting, attack) whose runs span at least two poisoning rates."""
    # (setting, attack with its other parameters) -> rate -> seed -> (cad, asr); a model's values
    # repeat across defenses, so each (rate, seed) counts once
    points: dict[tuple[str, str], dict[float, dict[int, tuple[float, float]]]] = defaultdict(lambda: defaultdict(dict))
    for item in labelled:
        record, params = item.record, item.attack_params
        if not record.ok or "poison_rate" not in params or "trojan/asr" not in record.metrics:
            continue
        others = ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if k != "poison_rate")
        family = f"{record.attack} ({others})" if others else record.attack
        points[item.setting, family][float(params["poison_rate"])][record.seed] = (
            float(record.metrics["attack/cad"]), float(record.metrics["trojan/asr"]))
    result = []
    for (setting, family), by_rate in sorted(points.items()):
        rates = sorted(by_rate)
        means = [(statistics.fmean(c for c, _ in by_rate[r].values()), statistics.fmean(a for _, a in by_rate[r].values()))
                 for r in rates]
        kept = sorted((cad, asr, rate) for rate, (cad, asr) in zip(rates, means) if cad <= CAD_BOUND)
        cad, asr, kept_rates = [k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept]
        curve = Curve(setting, family, kept_rates, cad, asr, [], [], None)
        if len(kept) < 2:
            curve.note = f"fewer than 2 poisoning rates with CAD <= {CAD_BOUND:g}"
        else:
            cad_norm, asr_norm = _normalise(cad), _normalise(asr)
            if cad_norm is None or asr_norm is None:
                curve.note = "CAD or ASR is the same at every rate: nothing to normalise"
            else:
                curve.cad_norm, curve.asr_norm = cad_norm, asr_norm
                curve.auc = trapezoid(cad_norm, asr_norm)
        result.append(curve)
    return result


def write_curves(found: list[Curve], out_dir: Path) -> list[Path]:
    """``tradeoff.csv`` with every point, and one PNG per setting; returns the PNG paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "tradeoff.csv").open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["setting", "attack", "poison_rate", "cad", "asr", "cad_norm", "asr_norm", "auc"])
        for curve in found:
            for i, rate in enumerate(curve.rates):
                normed = [repr(curve.cad_norm[i]), repr(curve.asr_norm[i])] if curve.cad_norm else ["", ""]
                writer.writerow([curve.setting, curve.attack, rate, repr(curve.cad[i]), repr(curve.asr[i]), *normed,
                                 "" if curve.auc is None else repr(curve.auc)])
    pictures = []
    for setting in sorted({c.setting for c in found}):
        drawn = [c for c in found if c.setting == setting and c.auc is not None]
        if not drawn:
            continue
        figure = Figure(figsize=(5, 4))
        axes = figure.subplots()
        for curve in drawn:
            axes.plot(curve.cad_norm, curve.asr_norm, marker="o", label=f"{curve.attack} (AUC {curve.auc:.3f})")
        axes.set_xlabel("CAD (normalised)")
        axes.set_ylabel("ASR (normalised)")
        axes.set_title(f"{setting}\nefficacy-specificity trade-off", fontsize=10)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = out_dir / f"tradeoff_{slug(setting)}.png"
        figure.savefig(path, dpi=120)
        pictures.append(path)
    return pictures
