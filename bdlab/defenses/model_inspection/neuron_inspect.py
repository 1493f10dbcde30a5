"""NeuronInspect (Huang et al., 2019): the target class's output explanations are sparse, smooth and persistent."""

from __future__ import annotations

from typing import Any

import torch
from captum.attr import Saliency
from torch import Tensor, nn

from bdlab.datasets.base import ImageSet, to_float
from bdlab.defenses.model_inspection.base import SIDES, ModelInspection
from bdlab.errors import ConfigError, check_at_least, check_range
from bdlab.evaluate import model_device
from bdlab.services import RunServices


def saliency_maps(model: nn.Module, x: Tensor, target: int) -> Tensor:
    """``(N, H, W)`` output saliency of class ``target``: captum's absolute input gradient of its logit,
    the largest over colour channels (Simonyan et al.'s map)."""
    return Saliency(model).attribute(x.clone().requires_grad_(True), target=target, abs=True).amax(1).detach()


def explanation_features(maps: Tensor, top: float) -> tuple[Tensor, Tensor, Tensor]:
    """NeuronInspect's three features of one class's maps ``(N, H, W)``, each map scaled to a peak of 1:

    - sparsity: the mean of the scaled map (its L1 norm per pixel; low = sparse),
    - smoothness: its total variation per pixel (mean absolute difference of neighbours; low = smooth),
    - persistence: how often a pixel in an image's top ``top`` share is also in the top of the other
      images (``sum f^2 / sum f`` of the per-pixel frequency ``f`` of being in the top; 1 = the same
      pixels in every image).

    Each is the median over the images where per image (sparsity, smoothness), as NeuronInspect does."""
    scaled = maps / maps.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
    sparsity = scaled.flatten(1).mean(1).median()
    smoothness = ((scaled[:, 1:] - scaled[:, :-1]).abs().flatten(1).mean(1)
                  + (scaled[:, :, 1:] - scaled[:, :, :-1]).abs().flatten(1).mean(1)).median()
    count = max(1, round(top * scaled[0].numel()))
    indices = scaled.flatten(1).topk(count, dim=1).indices
    hits = torch.zeros_like(scaled.flatten(1)).scatter_(1, indices, 1.0)
    frequency = hits.mean(0)
    persistence = (frequency ** 2).sum() / frequency.sum()
    return sparsity, smoothness, persistence


class NeuronInspect(ModelInspection):
    """NeuronInspect (Huang, Alzantot & Srivastava, "NeuronInspect: Detecting Backdoors in Neural Networks
    via Output Explanations", 2019, §3; TrojanZoo's "Ni", Table 21: lambda_sp = lambda_sm = 1e-5,
    lambda_pe = 1 on its unscaled features).

    The blind version: TrojanZoo's port computes the sparsity and smoothness on images stamped with
    the attack's *true* trigger, which a defender does not have; here every feature comes from
    held-out clean images only (the paper's setting: the target label's explanation of clean images
    already points at the trigger's location).

    1. Output explanations: per class ``k``, the saliency map of ``k``'s logit on each of the
       ``optimisation_images`` held-out images (:func:`saliency_maps`, ``captum.attr.Saliency``).
    2. Features (:func:`explanation_features`): sparsity, smoothness and persistence of the maps
       scaled to a peak of 1, so classes with steeper logits are not favoured.
    3. Combination: ``score_k = lambda_pe * persistence - lambda_sp * sparsity - lambda_sm * smoothness``
       (all three are shares in [0, 1] here, so equal weights 1 by default): a backdoor's target has
       sparse, smooth, persistent maps, hence a *high* score.
    4. Outliers: the protocol's anomaly index on the scores (NeuronInspect's MAD outlier test on its
       combined feature); a class with AIV > ``aiv_threshold`` on the ``side`` of the median is flagged.
       The paper's hypothesis puts the target on the ``high`` side. In the blind version it need not:
       on MNIST / LeNet vs BadNets the target's clean-image maps *spread* to the trigger's corner
       besides the digit (less sparse, less smooth, less persistent; AIV ~7 on the low side), so the
       default is ``both``, a two-sided test; ``high`` is the paper's one-sided one.

    No trigger is recovered: MLN, MJS, #pixels and the trigger's ASR are "n/a".

    Args:
        top: share of a map's pixels that count as its top for persistence (default 0.05).
        side: ``both`` (default), ``high`` (the paper's direction) or ``low``.
        weight_sparsity, weight_smoothness, weight_persistence: the lambdas (default 1, 1, 1).
        optimisation_images: held-out images explained (default 100, TrojanZoo samples 10% of the
            training set).
        evaluation_images, aiv_threshold, seed: as
            :class:`~bdlab.defenses.model_inspection.base.ModelInspection` (defaults 1, 2).
    """

    name = "neuron_inspect"
    suspicious = "both"
    recovers_trigger = False

    def __init__(self, top: float = 0.05, side: str = "both", weight_sparsity: float = 1.0, weight_smoothness: float = 1.0,
                 weight_persistence: float = 1.0, optimisation_images: int = 100, evaluation_images: int = 1,
                 aiv_threshold: float = 2.0, seed: int = 0) -> None:
        super().__init__(optimisation_images, evaluation_images, aiv_threshold, seed)
        check_range("defense.top", top, 0.0, 1.0, low_open=True, high_open=True)
        for field, value in (("weight_sparsity", weight_sparsity), ("weight_smoothness", weight_smoothness),
                             ("weight_persistence", weight_persistence)):
            check_at_least(f"defense.{field}", value, 0)
        if weight_sparsity + weight_smoothness + weight_persistence == 0:
            raise ConfigError("defense.weight_persistence", "all three weights are 0; give at least one a weight > 0")
        if side not in SIDES:
            raise ConfigError("defense.side", f"got {side!r}, must be one of {', '.join(SIDES)}")
        self.top, self.suspicious = float(top), side
        self.weights = (float(weight_sparsity), float(weight_smoothness), float(weight_persistence))

    def settings(self) -> dict[str, Any]:
        return {"top": self.top, "weights": list(self.weights)}  # the side only reads the scores

    def score(self, model: nn.Module, images: ImageSet, num_classes: int, services: RunServices) -> dict[str, Tensor]:
        model.eval()
        x = to_float(images.images.to(model_device(model)))
        features = torch.stack([torch.stack(explanation_features(saliency_maps(model, x, k).cpu(), self.top))
                                for k in range(num_classes)])  # (K, 3)
        sparsity, smoothness, persistence = features.unbind(1)
        w_sp, w_sm, w_pe = self.weights
        return {"score": w_pe * persistence - w_sp * sparsity - w_sm * smoothness, "sparsity": sparsity,
                "smoothness": smoothness, "persistence": persistence}
