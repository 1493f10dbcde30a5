"""Neuron separation ratio (TrojanZoo §4.2, Eq. 4; Table 16): how differently a layer's neurons respond to
clean and to triggered inputs.

``NSR = 1 - |N_t ∩ N_c| / |N_t ∪ N_c|`` with ``N_c`` and ``N_t`` the top-k neurons of the layer by mean
activation over clean and over triggered inputs. A benign model uses the same neurons for both (NSR
near 0); a trojaned one routes triggered inputs through neurons clean inputs leave quiet. The root
config's ``nsr`` node (:class:`NSRSettings`) names the layer (default: the penultimate one, as in the
paper) and ``k`` (default null: :data:`TOP_SHARE`, 10% of the layer's neurons, at least one;
TrojanZoo leaves it unstated). A convolution's channels are averaged over space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig
from torch import Tensor

from bdlab.errors import ConfigError
from bdlab.evaluate import predict
from bdlab.models.classifier import PENULTIMATE, Classifier

if TYPE_CHECKING:
    from bdlab.services import RunServices

TOP_SHARE = 0.1
#: images of each kind NSR averages over (the first ones of the clean and the poisoned test sets)
MAX_IMAGES = 1000


def top_k(mean_activation: Tensor, k: int) -> set[int]:
    return set(mean_activation.topk(k).indices.tolist())


def neuron_separation(clean: Tensor, triggered: Tensor, k: int) -> float:
    """Eq. 4 on activations ``(N, D)`` of clean inputs and ``(M, D)`` of triggered ones."""
    if clean.shape[1:] != triggered.shape[1:] or not 1 <= k <= clean.shape[1]:
        raise ValueError(f"need activations over the same {clean.shape[1]} neurons and 1 <= k <= that, got k={k}")
    c, t = top_k(clean.mean(0), k), top_k(triggered.mean(0), k)
    return 1.0 - len(c & t) / len(c | t)


def layer_activations(model: Classifier, images: Tensor, layer: str) -> Tensor:
    """``(N, D)`` activations of ``layer`` for uint8 ``images`` (channels averaged over space)."""
    out = predict(model, images, layers=layer)
    return out.mean((2, 3)) if out.dim() == 4 else out.flatten(1)


def default_k(width: int) -> int:
    return max(1, round(TOP_SHARE * width))


def model_nsr(model: Classifier, clean: Tensor, triggered: Tensor, layer: str = PENULTIMATE,
              top_k: int | None = None) -> float:
    """NSR of ``model`` at ``layer`` from the first :data:`MAX_IMAGES` uint8 clean and triggered images, over
    the ``top_k`` most active neurons (None: :func:`default_k` of the layer's width)."""
    a = layer_activations(model, clean[:MAX_IMAGES], layer)
    b = layer_activations(model, triggered[:MAX_IMAGES], layer)
    return neuron_separation(a, b, default_k(a.shape[1]) if top_k is None else top_k)


@dataclass(frozen=True)
class NSRSettings:
    """The root config's ``nsr`` node: the ``layer`` NSR reads (a :meth:`Classifier.layer_names` name;
    default ``penultimate``) and ``top_k`` (default None: 10% of the layer's neurons)."""

    layer: str = PENULTIMATE
    top_k: int | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> NSRSettings:
        node = cfg.get("nsr") or {}
        layer, top_k = node.get("layer", PENULTIMATE), node.get("top_k")
        if not isinstance(layer, str) or not layer:
            raise ConfigError("nsr.layer", f"got {layer!r}, must name a layer of the model (default penultimate)")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ConfigError("nsr.top_k", f"got {top_k!r}, must be an integer >= 1 or null (10% of the layer)")
        return cls(layer, top_k)

    def check(self, model: Classifier, image_shape: tuple[int, ...]) -> None:
        """Refuse a layer ``model`` lacks (listing its layers) or a ``top_k`` wider than the layer, before training."""
        model.check_layer("nsr.layer", self.layer)
        with torch.no_grad():
            out = model.eval().features(torch.zeros(1, *image_shape), self.layer)
        width = out.shape[1]
        if self.top_k is not None and self.top_k > width:
            raise ConfigError("nsr.top_k", f"got {self.top_k}, but layer {self.layer!r} has {width} neurons; "
                              f"use at most {width} or null (10%: {default_k(width)})")

    def measure(self, model: Classifier, services: RunServices) -> float:
        """NSR of ``model`` between the run's poisoned test images and their clean sources: the one
        measurement of the clean, the trojaned (``clean/nsr``, ``trojan/nsr``) and a sanitised model
        (``defense/nsr``)."""
        poisoned = services.poisoned_test
        return model_nsr(model, services.data.test.images[poisoned.sources], poisoned.images, self.layer, self.top_k)
