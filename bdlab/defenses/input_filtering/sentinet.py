"""SentiNet (Chou, Tramer & Pellegrino, 2020): a salient region that fools other images is a trigger."""

from __future__ import annotations

import torch
from torch import Tensor

from bdlab.attacks.base import Attack
from bdlab.attribution import attribute, grad_cam_layer, normalise
from bdlab.datasets.base import DatasetSplits, to_float
from bdlab.defenses.input_filtering.base import InputFilteringDefense
from bdlab.defenses.input_filtering.neo import chunked_probabilities
from bdlab.errors import ConfigError, check_at_least, check_range
from bdlab.evaluate import model_device, predict
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices


def fit_boundary(confidence: Tensor, fooled: Tensor, bins: int, degree: int, ridge: float = 1e-6) -> Tensor:
    """SentiNet's decision boundary (Chou et al. §3.3): the clean points' (inert confidence, fooled share)
    plane is cut into ``bins`` equal-width confidence bins; the point of largest fooled share in each
    non-empty bin is kept, and a polynomial of ``degree`` (fewer when fewer bins are filled) is fitted to
    those by least squares (a tiny ridge, so equal points do not make the system singular). Returns the
    coefficients, lowest power first."""
    confidence, fooled = confidence.double().cpu(), fooled.double().cpu()
    low, high = float(confidence.min()), float(confidence.max())
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    which = torch.bucketize(confidence, edges[1:-1])
    xs, ys = [], []
    for index in which.unique():
        members = (which == index).nonzero().squeeze(1)
        top = members[fooled[members].argmax()]
        xs.append(confidence[top])
        ys.append(fooled[top])
    x, y = torch.stack(xs), torch.stack(ys)
    degree = min(degree, len(x) - 1)
    powers = x[:, None] ** torch.arange(degree + 1, dtype=torch.float64)
    system = powers.T @ powers + ridge * torch.eye(degree + 1, dtype=torch.float64)
    return torch.linalg.solve(system, powers.T @ y)


def boundary_at(coefficients: Tensor, confidence: Tensor, low: float, high: float) -> Tensor:
    """The boundary's fooled share at ``confidence``, held flat outside the clean points' range ``[low, high]``
    (a fitted quadratic is not to be trusted beyond the data it saw)."""
    x = confidence.double().cpu().clamp(low, high)
    return (x[:, None] ** torch.arange(len(coefficients), dtype=torch.float64)) @ coefficients


class SentiNet(InputFilteringDefense):
    """SentiNet (Chou, Tramer & Pellegrino, "SentiNet: Detecting Localized Universal Attacks Against Deep
    Learning Systems", IEEE S&P Workshops 2020; TrojanZoo reference [13]).

    Per input ``x`` with predicted class ``y``, batched:

    1. *Region* (§3.1): the Grad-CAM map (captum ``LayerGradCam`` with ReLU, bilinearly upsampled, via
       :func:`bdlab.attribution.attribute`) of ``y`` at ``layer`` (default: the last ``nn.Conv2d``), scaled to
       a maximum of 1 and thresholded at ``mask_threshold``, is the salient mask ``m``. Gradients are taken
       through the classifier's normalisation, with respect to pixels. The paper's class proposals
       (masks of the top-k classes subtracted from ``y``'s, for natural images with several objects)
       are not implemented: one mask of the predicted class.
    2. *Testing* (§3.2): ``x`` in ``m`` is pasted onto ``num_overlays`` held-out clean images (drawn
       once, seeded); the *fooled share* is the share of those whose label is not ``y`` that are now
       predicted ``y``. An inert pattern (uniform noise, drawn once) is pasted in ``m`` onto the same
       images; the *confidence* is the mean top-class softmax on them (the paper's AvgConf: a large
       benign region also hurts the images under noise, a small trigger does not).
    3. *Decision* (§3.3): the boundary is fitted on held-out clean inputs' (confidence, fooled) points,
       images disjoint from the overlays (:func:`fit_boundary`: the upper envelope over ``bins``
       confidence bins, a polynomial of ``degree`` 2 as in the paper). The paper flags points above the
       boundary by their distance to it; the continuous suspicion score here is the vertical distance
       ``fooled - boundary(confidence)`` (positive above the boundary; the boundary is held flat beyond
       the clean confidences).

    The protocol's threshold is set on all held-out scores, which include the images the boundary was
    fitted on (their scores sit at or below 0 at each bin's envelope); the reported FPR is measured on
    clean *test* inputs, which neither step saw.

    Args:
        layer: the convolution of the Grad-CAM map (null: the model's last ``nn.Conv2d``).
        mask_threshold: share of the map's maximum a pixel needs to be in the mask, in (0, 1) (default 0.5).
        num_overlays: held-out clean images each region is pasted on (default 100).
        boundary_images: held-out clean images (after the overlays) whose points fit the boundary (default 200).
        bins: confidence bins of the boundary fit, >= 1 (default 10).
        degree: polynomial degree of the boundary, >= 0 (default 2, the paper's quadratic).
        batch_size: inputs per chunk (each expands into ``2 x num_overlays`` images).
        max_inputs: clean and poisoned test inputs scored (default 500, a seeded subset).
        fpr, seed: see :class:`~bdlab.defenses.input_filtering.base.InputFilteringDefense`.
    """

    name = "sentinet"

    def __init__(self, layer: str | None = None, mask_threshold: float = 0.5, num_overlays: int = 100,
                 boundary_images: int = 200, bins: int = 10, degree: int = 2, batch_size: int = 16,
                 max_inputs: int | None = 500, **kwargs) -> None:
        super().__init__(max_inputs=max_inputs, **kwargs)
        check_range("defense.mask_threshold", mask_threshold, 0.0, 1.0, low_open=True, high_open=True)
        for field, value, least in (("defense.num_overlays", num_overlays, 1),
                                    ("defense.boundary_images", boundary_images, 1), ("defense.bins", bins, 1),
                                    ("defense.degree", degree, 0), ("defense.batch_size", batch_size, 1)):
            check_at_least(field, value, least)
        self.layer, self.mask_threshold = layer, float(mask_threshold)
        self.num_overlays, self.boundary_images = int(num_overlays), int(boundary_images)
        self.bins, self.degree, self.batch_size = int(bins), int(degree), int(batch_size)

    def setup(self, data: DatasetSplits, attack: Attack) -> None:
        needed = self.num_overlays + self.boundary_images
        if needed > len(data.defense):
            raise ConfigError("defense.boundary_images", f"{self.num_overlays} overlay + {self.boundary_images} "
                              f"boundary images are asked for, but the held-out clean split has {len(data.defense)}; "
                              "lower defense.num_overlays or defense.boundary_images, or raise dataset.defense_fraction")

    def check_model(self, model: Classifier) -> None:
        grad_cam_layer(model, self.layer, "defense.layer")

    def masks(self, model: Classifier, x: Tensor, predicted: Tensor) -> Tensor:
        """``(B, 1, H, W)`` salient masks: each Grad-CAM map of the predicted class at ``mask_threshold`` of its peak."""
        cam = attribute(model, x, predicted.cpu(), "grad_cam", layer=self.layer, batch_size=len(x))[:, :1]
        return (normalise(cam) >= self.mask_threshold).float().to(x.device)

    def points(self, model: Classifier, x: Tensor, pool: Tensor, pool_labels: Tensor, inert: Tensor) -> Tensor:
        """``(B, 2)`` (inert confidence, fooled share) of a float batch ``x``."""
        predicted = predict(model, x).argmax(1).to(x.device)
        mask = self.masks(model, x, predicted)[:, None]  # (B, 1, 1, H, W)
        kept = pool[None] * (1 - mask)
        batch, count = len(x), len(pool)
        pasted = chunked_probabilities(model, (kept + (x[:, None] * mask)).flatten(0, 1)).argmax(1).view(batch, count)
        others = pool_labels[None] != predicted[:, None]
        fooled = ((pasted == predicted[:, None]) & others).sum(1).float() / others.sum(1).clamp_min(1).float()
        noised = chunked_probabilities(model, (kept + inert[None] * mask).flatten(0, 1))
        confidence = noised.max(1).values.view(batch, count).mean(1)
        return torch.stack([confidence, fooled], 1)

    def all_points(self, model: Classifier, images: Tensor, pool: Tensor, pool_labels: Tensor,
                   inert: Tensor) -> Tensor:
        device = model_device(model)
        # not one predict(): each chunk needs its Grad-CAM masks (gradients) before its pasted copies run
        return torch.cat([self.points(model, to_float(chunk.to(device)), pool, pool_labels, inert).cpu()
                          for chunk in images.split(self.batch_size)])

    def scores(self, context: RunServices, images: Tensor) -> Tensor:
        model = context.trojan_model().eval()
        device = model_device(model)
        held_out = context.data.defense
        order = torch.randperm(len(held_out), generator=torch.Generator().manual_seed(self.seed))
        overlays, fitting = order[:self.num_overlays], order[self.num_overlays:self.num_overlays + self.boundary_images]
        pool = to_float(held_out.images[overlays].to(device))
        pool_labels = held_out.labels[overlays].to(device)
        inert = torch.rand(pool.shape, generator=torch.Generator().manual_seed(self.seed + 1)).to(device)
        clean = self.all_points(model, held_out.images[fitting], pool, pool_labels, inert)
        coefficients = fit_boundary(clean[:, 0], clean[:, 1], self.bins, self.degree)
        low, high = float(clean[:, 0].min()), float(clean[:, 0].max())
        points = self.all_points(model, images, pool, pool_labels, inert)
        return (points[:, 1].double() - boundary_at(coefficients, points[:, 0], low, high)).float()
