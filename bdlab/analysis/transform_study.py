"""The translation / scaling / rotation study shared by trigger_transform and image_transform
("Why is your Trojan NOT responding?", section 4.2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import matplotlib.pyplot as plt

from bdlab.analysis.base import Analysis
from bdlab.analysis.common import Transform, save_figure, write_table
from bdlab.errors import ConfigError
from bdlab.services import RunServices
from bdlab.transforms import check_scale, circle_offsets

# one measured configuration: (kind, parameter, point) -> row of values
Measure = Callable[[str, float, Transform | None, tuple[int, int] | None], list[float]]


def check_study(prefix: str, radii: list[int], points: int, scales: list[float], angles: list[float]) -> None:
    """Refuse values that cannot work, naming the field."""
    if any(r < 0 for r in radii):
        raise ConfigError(f"{prefix}.radii", f"got {radii}, radii must be >= 0")
    if points < 8:
        raise ConfigError(f"{prefix}.points", f"got {points}, use at least 8 points per circle")
    for factor in scales:
        check_scale(f"{prefix}.scales", factor)
    if any(abs(a) > 360 for a in angles):
        raise ConfigError(f"{prefix}.angles", f"got {angles}, angles must be in [-360, 360] degrees")


def plot_study(context: RunServices, name: str, rows: list[list[Any]], columns: list[str],
               series: list[tuple[str, str]]) -> None:
    """One panel per transformation kind; ``series`` = (column, label) curves, averaged per parameter."""
    figure, panels = plt.subplots(1, 3, figsize=(12, 3.2))
    for axes, kind, xlabel in zip(panels, ("translate", "scale", "rotate"), ("radius (px)", "factor", "degrees")):
        chosen = [r for r in rows if r[0] == kind]
        parameters = sorted({r[1] for r in chosen})
        for column, label in series:
            index = columns.index(column)
            means = [sum(r[index] for r in chosen if r[1] == p) / max(1, sum(1 for r in chosen if r[1] == p))
                     for p in parameters]
            axes.plot(parameters, means, "o-" if column != "acc" else "s--", label=label)
        axes.set(title=kind, xlabel=xlabel, ylabel="%", ylim=(-2, 102))
        axes.legend(fontsize=7)
    figure.suptitle(f"{context.attack.display_name}: {name.replace('_', ' ')}")
    save_figure(context, name, f"{name}.png", figure)


def run_study(context: RunServices, name: str, radii: list[int], points: int, scales: list[float],
              angles: list[float], columns: list[str], measure: Measure,
              translate: Callable[[int, int], Transform], scale: Callable[[float], Transform],
              rotate: Callable[[float], Transform]) -> dict[str, Any]:
    """Measure every configuration, write CSV + PNG, return per-parameter means of each column."""
    rows: list[list[Any]] = []
    for radius in radii:
        for dy, dx in sorted(set(circle_offsets(radius, points))):
            rows.append(["translate", radius, dy, dx, *measure("translate", radius, translate(dy, dx), (dy, dx))])
    for factor in scales:
        rows.append(["scale", factor, 0, 0, *measure("scale", factor, scale(factor), None)])
    for angle in angles:
        rows.append(["rotate", angle, 0, 0, *measure("rotate", angle, rotate(angle), None)])
    header = ["transform", "parameter", "dy", "dx", *columns]
    write_table(context, name, f"{name}.csv", header, rows)
    plot_study(context, name, rows, header, [(c, c) for c in columns if c in ("asr", "acc")])
    metrics: dict[str, Any] = {}
    for kind in ("translate", "scale", "rotate"):
        for parameter in sorted({r[1] for r in rows if r[0] == kind}):
            chosen = [r for r in rows if r[0] == kind and r[1] == parameter]
            for offset, column in enumerate(columns, start=4):
                metrics[f"analysis/{name}/{kind}_{parameter:g}/{column}"] = sum(r[offset] for r in chosen) / len(chosen)
    return metrics


class TransformStudy(Analysis):
    """The fields both transformation studies share: translation radii with ``points`` per circle,
    scale factors (each study gives its own default), rotation angles, and the number of test
    images evaluated."""

    def __init__(self, radii: list[int] = (1, 2, 3), points: int = 8, scales: list[float] = (0.8, 1.0, 1.2),
                 angles: list[float] = (0, 15, 30, 45, 60, 75, 90), max_images: int = 1000) -> None:
        self.radii, self.points = [int(r) for r in radii], int(points)
        self.scales = [float(s) for s in scales]
        self.angles = [float(a) for a in angles]
        self.max_images = int(max_images)
        check_study(f"analysis.{self.name}", self.radii, self.points, self.scales, self.angles)
