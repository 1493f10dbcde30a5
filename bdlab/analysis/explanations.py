"""Explanation maps of clean and triggered inputs (captum): Saliency, SmoothGrad and Grad-CAM grids,
TrojanZoo's attribution distance (§6.4, Table 19), and SmoothGrad on transformed poisoned inputs
("Why is your Trojan NOT responding?", §4.3, Fig. 5). The maps themselves live in :mod:`bdlab.attribution`."""

from __future__ import annotations

import math
from typing import Any

import matplotlib.pyplot as plt
from torch import Tensor

from bdlab.analysis.base import Analysis
from bdlab.analysis.common import evaluation_images, save_figure, write_table
from bdlab.attacks.base import Attack
from bdlab.attribution import (
    attribute,
    attribution_distance,
    check_method,
    check_smoothgrad,
    grad_cam_layer,
    heatmap,
    mass_inside,
    normalise,
)
from bdlab.datasets.base import DatasetSplits, ImageSet, to_float
from bdlab.errors import ConfigError, check_at_least
from bdlab.evaluate import evaluate
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices
from bdlab.transforms import check_scale, rotate, scale

MODELS = ("trojan", "clean")
CLASSES = ("original", "target")  # TrojanZoo Table 19's columns: the input's true class and the target class


def _model(context: RunServices, which: str) -> Classifier:
    return context.trojan_model() if which == "trojan" else context.clean_model()


def _local_mask(attack: Attack) -> Tensor | None:
    """The trigger's ``(H, W)`` bool mask where it is one fixed local patch; None otherwise (no mass share)."""
    mask = attack.trigger_mask
    if mask is None or bool(mask.all()):
        return None
    return mask.cpu()


def _refuse_no_attack(field: str, attack: Attack) -> None:
    if not attack.has_poisoned_test:
        raise ConfigError(field, "explains clean and triggered inputs; attack=none (or attack=given without "
                          "attack.trigger) has no trigger")


def plot_grid(context: RunServices, name: str, file: str, rows: list[tuple[str, Tensor, bool]], title: str,
              captions: list[str] | None = None, outline: Tensor | None = None) -> None:
    """One PNG: each row is ``(label, tensor, is_map)``; images ``(N, C, H, W)`` in ``[0, 1]`` are shown as
    they are, maps ``(N, H, W)`` as heat maps scaled to their own maximum. ``captions`` go above row 0;
    ``outline`` (an ``(H, W)`` bool mask, the trigger's) is drawn on every map, as Fig. 5's red box."""
    count = rows[0][1].shape[0]
    figure, axes = plt.subplots(len(rows), count, figsize=(1.1 * count + 1.4, 1.1 * len(rows) + 0.5), squeeze=False,
                                layout="constrained")
    for r, (label, values, is_map) in enumerate(rows):
        for c in range(count):
            ax = axes[r][c]
            if is_map:
                ax.imshow(normalise(values[c:c + 1])[0].numpy(), cmap="inferno", vmin=0, vmax=1)
                if outline is not None and outline.any():
                    ax.contour(outline.float().numpy(), levels=[0.5], colors="cyan", linewidths=0.6)
            elif values.shape[1] == 1:
                ax.imshow(values[c, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(values[c].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
            if r == 0 and captions is not None:
                ax.set_title(captions[c], fontsize=6)
    figure.suptitle(title, fontsize=8)
    save_figure(context, name, file, figure)


class ExplanationMaps(Analysis):
    """What the three map analyses share: maps of the first ``max_images`` non-target test images and of
    their triggered copies, for the true ("original") and the target class, on the trojaned and the clean
    model; a grid of the first ``images`` of them; the share of attribution mass on the trigger.

    Writes ``<name>/<name>.png`` (rows: clean inputs, their maps per model and class, triggered inputs,
    theirs), logged as a W&B image where a W&B logger runs. Returns, where the attack's trigger is one
    fixed local patch (BadNets, ...; NaN otherwise), the mean % of each triggered input's map inside the
    trigger mask as ``analysis/<name>/<model>_<class>/trigger_mass`` and the same for the clean inputs
    (the mass a map puts there by chance) as ``analysis/<name>/<model>_<class>/clean_mass``.
    """

    name = "explanations"
    method = "saliency"

    def __init__(self, images: int = 8, max_images: int = 100) -> None:
        self.images, self.max_images = int(images), int(max_images)
        check_at_least(f"analysis.{self.name}.images", self.images, 1)
        check_at_least(f"analysis.{self.name}.max_images", self.max_images, self.images)

    def attribute_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~bdlab.attribution.attribute` for this method."""
        return {}

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        _refuse_no_attack(f"analysis.{self.name}", attack)

    def maps(self, model: Classifier, images: Tensor, targets: Tensor | int) -> Tensor:
        """``(N, H, W)`` heat maps of float images for the classes ``targets``."""
        return heatmap(attribute(model, images, targets, self.method, **self.attribute_options()))

    def run(self, context: RunServices) -> dict[str, Any]:
        target = context.attack.target_class
        clean, poisoned = evaluation_images(context, self.max_images)
        clean_x, poisoned_x = to_float(clean.images), to_float(poisoned.images)
        mask = _local_mask(context.attack)
        metrics: dict[str, Any] = {}
        clean_rows: list[tuple[str, Tensor, bool]] = [("clean input", clean_x[:self.images], False)]
        poisoned_rows: list[tuple[str, Tensor, bool]] = [("triggered input", poisoned_x[:self.images], False)]
        for which in MODELS:
            model = _model(context, which)
            for kind in CLASSES:
                classes = clean.labels if kind == "original" else target
                clean_maps, poisoned_maps = self.maps(model, clean_x, classes), self.maps(model, poisoned_x, classes)
                clean_rows.append((f"{which}\n{kind}", clean_maps[:self.images], True))
                poisoned_rows.append((f"{which}\n{kind}", poisoned_maps[:self.images], True))
                for key, maps in (("trigger_mass", poisoned_maps), ("clean_mass", clean_maps)):
                    metrics[f"analysis/{self.name}/{which}_{kind}/{key}"] = math.nan if mask is None else \
                        float(mass_inside(maps, mask).nanmean())
        captions = [f"label {int(y)}" for y in clean.labels[:self.images]]
        plot_grid(context, self.name, f"{self.name}.png", clean_rows + poisoned_rows,
                  f"{context.attack.display_name}: {self.method} maps (target class {target})", captions, mask)
        return metrics


class SaliencyMaps(ExplanationMaps):
    """Saliency maps (Simonyan et al. 2014; captum ``Saliency``, ``|dy_c/dx|``, max over channels) of
    clean and triggered inputs for the true and the target class, on the trojaned and the clean model.
    See :class:`ExplanationMaps` for the files and metrics.

    Args:
        images: inputs shown in the grid (default 8).
        max_images: non-target test images the trigger-mass shares average over (default 100).
    """

    name = "saliency"
    method = "saliency"


class SmoothGradMaps(ExplanationMaps):
    """SmoothGrad maps (Smilkov et al. 2017; captum ``NoiseTunnel(Saliency)``, ``nt_type="smoothgrad"``)
    as :class:`SaliencyMaps`, and on transformed poisoned inputs as "Why is your Trojan NOT responding?"
    §4.3 / Fig. 5 does: each poisoned image is scaled about its centre and rotated clockwise
    (:func:`bdlab.transforms.scale` / :func:`~bdlab.transforms.rotate`, nearest, black fill, as in
    ``analysis=image_transform``) and explained on the trojaned model for the class it now predicts.

    Per transform strength it writes ``smoothgrad/<transform>_<parameter>.png`` (transformed inputs, their
    maps; captions give the prediction) and returns ``analysis/smoothgrad/<transform>_<parameter>/asr``
    and, for a fixed local trigger, ``.../trigger_mass``: the mean % of the map inside the equally
    transformed trigger mask (where the trigger's evidence goes as the backdoor stops firing; NaN when
    the transform moves the whole trigger out of the frame, e.g. a corner patch rotated about the centre).

    Args:
        images: inputs shown per grid (default 8).
        max_images: non-target test images measured (default 100).
        samples: noisy copies per input (default 50, Smilkov et al.'s).
        noise_std: noise std in ``[0, 1]`` pixel units (default 0.15: Smilkov et al.'s 10-20% of the range).
        scales: scale factors (default 0.8, 1.2).
        angles: rotation angles in degrees (default 15, 45, 90).
    """

    name = "smoothgrad"
    method = "smoothgrad"

    def __init__(self, images: int = 8, max_images: int = 100, samples: int = 50, noise_std: float = 0.15,
                 scales: list[float] = (0.8, 1.2), angles: list[float] = (15, 45, 90)) -> None:
        super().__init__(images, max_images)
        self.samples, self.noise_std = int(samples), float(noise_std)
        self.scales, self.angles = [float(f) for f in scales], [float(a) for a in angles]
        check_smoothgrad(f"analysis.{self.name}", self.samples, self.noise_std)
        for factor in self.scales:
            check_scale(f"analysis.{self.name}.scales", factor)
        if any(abs(a) > 360 for a in self.angles):
            raise ConfigError(f"analysis.{self.name}.angles", f"got {self.angles}, angles must be in [-360, 360]")

    def attribute_options(self) -> dict[str, Any]:
        return {"samples": self.samples, "noise_std": self.noise_std}

    def run(self, context: RunServices) -> dict[str, Any]:
        metrics = super().run(context)
        target = context.attack.target_class
        _, poisoned = evaluation_images(context, self.max_images)
        poisoned_x = to_float(poisoned.images)
        mask = _local_mask(context.attack)
        model = context.trojan_model()
        for kind, parameters, op in (("scale", self.scales, scale), ("rotate", self.angles, rotate)):
            for parameter in parameters:
                moved = op(poisoned_x, parameter)
                outcome = evaluate(model, None, poisoned, target, lambda x, op=op, p=parameter: op(x, p))
                predicted = outcome.poisoned_logits.argmax(1)
                maps = self.maps(model, moved, predicted)
                key = f"analysis/{self.name}/{kind}_{parameter:g}"
                metrics[f"{key}/asr"] = outcome.asr
                moved_mask = None if mask is None else op(mask[None, None].float(), parameter)[0, 0] > 0.5
                if moved_mask is not None and not moved_mask.any():
                    moved_mask = None  # the transform moved the trigger out of the frame: no share to measure
                metrics[f"{key}/trigger_mass"] = math.nan if moved_mask is None else \
                    float(mass_inside(maps, moved_mask).nanmean())
                captions = [f"{int(y)}->{int(p)}" for y, p in zip(poisoned.labels[:self.images],
                                                                  predicted[:self.images])]
                plot_grid(context, self.name, f"{kind}_{parameter:g}.png",
                          [(f"{kind} {parameter:g}", moved[:self.images], False),
                           ("trojan\npredicted", maps[:self.images], True)],
                          f"{context.attack.display_name}: SmoothGrad, poisoned inputs, {kind} {parameter:g} "
                          "(true -> predicted)", captions, moved_mask)
        return metrics


class GradCamMaps(ExplanationMaps):
    """Grad-CAM maps (Selvaraju et al. ICCV 2017, the attribution map of TrojanZoo §6.4 [48]; captum
    ``LayerGradCam`` with ReLU, ``LayerAttribution.interpolate`` bilinearly to the input size) as
    :class:`SaliencyMaps`.

    Args:
        images: inputs shown in the grid (default 8).
        max_images: non-target test images the trigger-mass shares average over (default 100).
        layer: the convolution to explain (default null: the backbone's last ``nn.Conv2d``).
    """

    name = "grad_cam"
    method = "grad_cam"

    def __init__(self, images: int = 8, max_images: int = 100, layer: str | None = None) -> None:
        super().__init__(images, max_images)
        self.layer = layer

    def check_model(self, model: Classifier) -> None:
        grad_cam_layer(model, self.layer, f"analysis.{self.name}.layer")

    def attribute_options(self) -> dict[str, Any]:
        return {"layer": self.layer}


class AttributionDistance(Analysis):
    """TrojanZoo §6.4 (RQ9), Table 19: the distance between the attribution maps of clean and triggered
    inputs, "l1-norm normalized by image size", for a benign and a trojaned model and for the original
    and the target class (Table 19, ImageNet, BadNets-style: benign 0.08% / 0.12%, trojan 0.63% / 8.52%).

    For each of the first ``images`` non-target test images ``x`` and its triggered copy ``x'``, and a
    class ``c``: ``d = ||A_c(x) - A_c(x')||_1 / (H W)`` in %, where ``A_c`` is the map
    (:func:`bdlab.attribution.heatmap`) scaled to a maximum of 1 (:func:`bdlab.attribution.normalise`; TrojanZoo's
    text does not say how maps are normalised, so this follows Grad-CAM's own visual normalisation).
    TrojanZoo uses Grad-CAM [48] on 100 pairs; ``method`` also takes saliency or smoothgrad.

    Returns ``analysis/attribution_distance/<model>_<class>`` for model in (trojan, clean) and class in
    (original = each input's true class, target) -- Table 19's four cells --, ``<model>_others`` (mean
    over the non-target output classes) and ``<model>_per_class`` (the list over every output class ``c``).
    Writes ``attribution_distance/attribution_distance.csv`` (model, class, distance), a bar chart per
    class (``attribution_distance.png``) and a grid of example maps for the true and the target class
    (``maps.png``).

    Args:
        method: saliency, smoothgrad or grad_cam (default grad_cam, TrojanZoo's).
        images: clean / triggered pairs (default 100, TrojanZoo's).
        layer: Grad-CAM convolution (default null: the last ``nn.Conv2d``).
        samples: SmoothGrad's noisy copies (default 50).
        noise_std: SmoothGrad's noise std in ``[0, 1]`` pixel units (default 0.15).
        shown: pairs drawn in the example grid (default 8).
    """

    name = "attribution_distance"
    headline_metrics = tuple((f"analysis/attribution_distance/{model}_{kind}",
                              f"Attribution distance, {title} model, {kind} class (%)")
                             for model, title in (("clean", "benign"), ("trojan", "trojan"))
                             for kind in CLASSES)

    def __init__(self, method: str = "grad_cam", images: int = 100, layer: str | None = None, samples: int = 50,
                 noise_std: float = 0.15, shown: int = 8) -> None:
        prefix = f"analysis.{self.name}"
        check_method(f"{prefix}.method", method)
        self.method, self.images, self.layer, self.shown = method, int(images), layer, int(shown)
        self.samples, self.noise_std = int(samples), float(noise_std)
        check_at_least(f"{prefix}.images", self.images, 1)
        check_at_least(f"{prefix}.shown", self.shown, 0)
        if method == "smoothgrad":
            check_smoothgrad(prefix, self.samples, self.noise_std)
        if method != "grad_cam" and layer is not None:
            raise ConfigError(f"{prefix}.layer", f"only Grad-CAM reads a layer; method is {method!r}: drop the layer")

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        _refuse_no_attack(f"analysis.{self.name}", attack)

    def check_model(self, model: Classifier) -> None:
        """Refuse a Grad-CAM layer the model lacks or that is not a convolution."""
        if self.method == "grad_cam":
            grad_cam_layer(model, self.layer, f"analysis.{self.name}.layer")

    def maps(self, model: Classifier, images: Tensor, targets: Tensor | int) -> Tensor:
        return heatmap(attribute(model, images, targets, self.method, layer=self.layer, samples=self.samples,
                                 noise_std=self.noise_std))

    def distances(self, model: Classifier, clean: ImageSet, poisoned: ImageSet,
                  num_classes: int) -> tuple[Tensor, list[float], tuple[Tensor, Tensor]]:
        """Per-pair distances for the true class ``(N,)``, the mean distance per output class, and the
        true-class maps of the clean and triggered inputs (for the grid)."""
        clean_x, poisoned_x = to_float(clean.images), to_float(poisoned.images)
        clean_maps, poisoned_maps = self.maps(model, clean_x, clean.labels), self.maps(model, poisoned_x, clean.labels)
        original = attribution_distance(clean_maps, poisoned_maps)
        per_class = [float(attribution_distance(self.maps(model, clean_x, c), self.maps(model, poisoned_x, c)).mean())
                     for c in range(num_classes)]
        return original, per_class, (clean_maps, poisoned_maps)

    def run(self, context: RunServices) -> dict[str, Any]:
        self.check_model(context.trojan_model())
        target, num_classes = context.attack.target_class, context.data.num_classes
        clean, poisoned = evaluation_images(context, self.images)
        metrics: dict[str, Any] = {}
        rows: list[list[Any]] = []
        grid: list[tuple[str, Tensor, bool]] = [("clean input", to_float(clean.images[:self.shown]), False),
                                                ("triggered input", to_float(poisoned.images[:self.shown]), False)]
        for which in MODELS:
            model = _model(context, which)
            original, per_class, (clean_maps, poisoned_maps) = self.distances(model, clean, poisoned, num_classes)
            others = [d for c, d in enumerate(per_class) if c != target]
            prefix = f"analysis/{self.name}/{which}"
            metrics.update({f"{prefix}_original": float(original.mean()), f"{prefix}_target": per_class[target],
                            f"{prefix}_others": sum(others) / len(others) if others else math.nan,
                            f"{prefix}_per_class": per_class})
            rows.append([which, "original", float(original.mean())])
            rows += [[which, str(c), d] for c, d in enumerate(per_class)]
            grid += [(f"{which} clean\n(true class)", clean_maps[:self.shown], True),
                     (f"{which} triggered\n(true class)", poisoned_maps[:self.shown], True)]
            if self.shown:
                grid += [(f"{which} {kind}\n(target class)", self.maps(model, to_float(images.images[:self.shown]), target),
                          True) for kind, images in (("clean", clean), ("triggered", poisoned))]
        write_table(context, self.name, f"{self.name}.csv", ["model", "class", "distance"], rows)
        self.plot_bars(context, metrics, num_classes, target)
        if self.shown:
            plot_grid(context, self.name, "maps.png", grid,
                      f"{context.attack.display_name}: {self.method} maps (target class {target})",
                      [f"label {int(y)}" for y in clean.labels[:self.shown]])
        return metrics

    def plot_bars(self, context: RunServices, metrics: dict[str, Any], num_classes: int, target: int) -> None:
        figure, axes = plt.subplots(figsize=(6, 3))
        width = 0.4
        for offset, which in ((-width / 2, "trojan"), (width / 2, "clean")):
            values = metrics[f"analysis/{self.name}/{which}_per_class"]
            axes.bar([c + offset for c in range(num_classes)], values, width, label=f"{which} model")
        axes.set(xlabel=f"explained class (target = {target})", ylabel="distance (%)", xticks=range(num_classes))
        axes.legend(fontsize=7)
        figure.suptitle(f"{context.attack.display_name}: {self.method} attribution distance, clean vs triggered",
                        fontsize=8)
        save_figure(context, self.name, f"{self.name}.png", figure)
