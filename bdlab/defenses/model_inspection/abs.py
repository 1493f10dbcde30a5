"""ABS (Liu et al., CCS 2019): stimulate single neurons, reverse-engineer triggers for the suspicious ones, score by REASR."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bdlab.datasets.base import ImageSet, to_float
from bdlab.defenses.model_inspection.base import ModelInspection, holdout_success
from bdlab.defenses.model_sanitisation.fine_pruning import last_convolution
from bdlab.errors import ConfigError, check_at_least, check_range
from bdlab.evaluate import model_device
from bdlab.inversion.engine import Trigger
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices

# the modules whose channel count is known before a forward pass, so "candidates > channels" fails early
CHANNELLED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


def channel_count(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.num_features


@torch.no_grad()
def stimulate(model: Classifier, x: Tensor, layer: str, values: Tensor) -> Tensor:
    """ABS §4.2's neuron stimulation: ``(neurons, levels, images, classes)`` logits of ``model`` on float
    images ``x`` with every output channel of ``layer`` in turn set, at all its positions, to each of
    ``values`` while the rest of the layer keeps what the image gives it."""
    module = dict(model.net.named_modules())[layer]
    levels, count = len(values), len(x)
    batch = x.repeat(levels, *([1] * (x.dim() - 1)))  # level-major: images of level 0, then of level 1, ...
    per_sample = values.to(x.device, x.dtype).repeat_interleave(count)
    neuron = 0

    def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        output = output.clone()
        output[:, neuron] = per_sample.view(-1, *([1] * (output.dim() - 2)))
        return output

    handle = module.register_forward_hook(hook)
    try:
        logits = []
        for neuron in range(channel_count(module)):
            logits.append(model(batch).view(levels, count, -1))
    finally:
        handle.remove()
    return torch.stack(logits)


def class_margins(logits: Tensor, labels: Tensor, consistency: float) -> Tensor:
    """``(neurons, classes)``: how far stimulating each neuron lifts class ``k`` above every other label.

    Per image, the elevation of a label is its largest logit over the stimulation levels minus its
    logit with the neuron at the lowest level (ABS's "elevation"); the margin of ``k`` is its elevation
    minus the largest elevation of a label other than ``k`` and the image's own (ABS excludes the
    ground truth). A neuron's margin for ``k`` is the ``1 - consistency`` quantile over the images not
    of class ``k``: positive when at least ``consistency`` of them see ``k`` elevated most (ABS asks
    all images, its TrojanZoo port 75%)."""
    elevation = logits.amax(1) - logits[:, 0]  # (neurons, images, classes)
    neurons, _, classes = elevation.shape
    margins = torch.empty(neurons, classes)
    own = torch.nn.functional.one_hot(labels.cpu(), classes).bool()
    for k in range(classes):
        others = elevation.clone()
        others[:, :, k] = -torch.inf
        others[own.expand(neurons, -1, -1)] = -torch.inf
        margin = elevation[:, :, k] - others.amax(2)  # (neurons, images)
        keep = labels.cpu() != k
        margins[:, k] = torch.quantile(margin[:, keep], 1.0 - consistency, dim=1) if keep.any() else -torch.inf
    return margins


class ABS(ModelInspection):
    """ABS, Artificial Brain Stimulation (Liu et al., "ABS: Scanning Neural Networks for Back-doors by
    Artificial Brain Stimulation", CCS 2019; TrojanZoo's "Abs", Table 21 settings where they apply).

    1. Stimulation (§4.2): every output channel ("neuron") of each of ``layers`` is set, at all positions, to ``levels`` values from 0 to ``sample_k`` x the layer's largest
       activation on the seed images (TrojanZoo's ``samp_k``, ``n_samples``), on each of
       ``seed_images`` held-out images; the logits are recorded (:func:`stimulate`).
    2. Candidates (§4.3, the elevation difference): a label's elevation is its peak logit over the
       levels minus its logit at level 0; a neuron's margin for class ``k`` is how far it lifts ``k``
       above every other label but the image's own, taken at the ``1 - consistency`` quantile over
       the seed images (:func:`class_margins`). ABS keeps the globally top neurons, which leaves most
       labels without a candidate (REASR 0, and a median absolute deviation of 0); so that every class
       has a score for the anomaly index, the ``candidates`` neurons with the largest margin *for each
       class* are kept instead (with ``candidates`` x classes >= ABS's 10-20 neurons).
    3. Reverse engineering (§4.4, Alg. 2, TrojanZoo's loss): per candidate, a mask and pattern
       (``stamp = (1 - m) x + m p``, sigmoid-parametrised) are optimised by Adam (``lr`` 0.1, ``steps``;
       ABS runs 1000, fewer here for CPU) on the seed images to maximise the candidate neuron's
       activation, keep the layer's other neurons low (weight ``others_weight``, 1e-4) and the mask
       small: its L1 norm is weighted ``size_weight`` above ``max_size`` pixels (TrojanZoo's 16;
       x2 above 1.2 x ``max_size``) and 0.01 x that below (TrojanZoo's schedule). The candidates of
       one layer are optimised together, as one batch.
    4. REASR (§4.5): share (%) of the held-out images after the seeds, of classes other than ``k``,
       that a candidate's trigger sends to ``k``. A class's score is the best REASR among its
       candidates, and its trigger the one reported (MLN, MJS, #pixels; the protocol measures its ASR
       on the separate evaluation images). Per class, the chosen neuron, its layer (an index into the
       layers) and its margin are reported as ``per_class/neuron``, ``layer``, ``margin``.

    Anomaly: ABS flags a model whose best REASR is high; here the REASRs of the classes go through the
    protocol's anomaly index (as TrojanZoo's Table 11 does) and a class with an abnormally *high*
    REASR (AIV > ``aiv_threshold``, above the median) is flagged if its REASR also reaches
    ``min_reasr`` (ABS's own criterion: with most classes at REASR 0 the median absolute deviation is
    tiny, and a class at 2% would pass AIV 2 alone).

    Args:
        layers: the layers whose neurons are stimulated (null: the last convolution and every linear
            layer after it but the head, like TrojanZoo's scan of several layers; each a Conv2d, Linear
            or BatchNorm2d, whose neuron count is known before a forward pass). On MNIST / LeNet the
            BadNets neuron is in ``fc1``, not in the last convolution.
        seed_images: held-out images stimulated and optimised on (default 30; TrojanZoo: 5 per
            class); the rest of ``optimisation_images`` measure REASR.
        levels: stimulation values per neuron (default 5, TrojanZoo's ``n_samples``).
        sample_k: the largest stimulation value, in multiples of the layer's peak activation (default 8).
        consistency: share of seed images that must agree on the elevated label (default 0.75).
        candidates: neurons kept per class, over all the layers (default 1).
        steps, lr: reverse-engineering Adam steps and step size (default 200, 0.1).
        max_size: mask L1 norm (pixels) above which it is penalised hard (default 16).
        size_weight: that penalty's weight, per pixel, against the neuron's activation divided by the
            layer's peak (default 0.015); x2 above 1.2 x ``max_size``, x0.01 below ``max_size``.
        others_weight: weight of the other neurons' activation (default 1e-4).
        min_reasr: REASR (%) a class needs to be flagged, besides its AIV (default 50).
        optimisation_images, evaluation_images, aiv_threshold, seed: as
            :class:`~bdlab.defenses.model_inspection.base.ModelInspection`
            (defaults 200, 200, 2).
    """

    name = "abs"
    suspicious = "high"

    def __init__(self, layers: list[str] | None = None, seed_images: int = 30, levels: int = 5, sample_k: float = 8.0,
                 consistency: float = 0.75, candidates: int = 1, steps: int = 200, lr: float = 0.1,
                 max_size: float = 16.0, size_weight: float = 0.015, others_weight: float = 1e-4,
                 min_reasr: float = 50.0, optimisation_images: int = 200, evaluation_images: int = 200,
                 aiv_threshold: float = 2.0, seed: int = 0) -> None:
        super().__init__(optimisation_images, evaluation_images, aiv_threshold, seed)
        check_at_least("defense.seed_images", seed_images, 1)
        if seed_images >= optimisation_images:
            raise ConfigError("defense.seed_images", f"got {seed_images}, must be below defense.optimisation_images "
                              f"({optimisation_images}): the images after the seeds measure REASR")
        check_at_least("defense.levels", levels, 2)
        check_at_least("defense.candidates", candidates, 1)
        check_at_least("defense.steps", steps, 1)
        check_range("defense.consistency", consistency, 0.0, 1.0, low_open=True)
        for field, value in (("sample_k", sample_k), ("lr", lr), ("max_size", max_size),
                             ("size_weight", size_weight)):
            if not value > 0:
                raise ConfigError(f"defense.{field}", f"got {value}, must be > 0")
        check_at_least("defense.others_weight", others_weight, 0)
        check_range("defense.min_reasr", min_reasr, 0.0, 100.0)
        self.min_reasr = float(min_reasr)  # only filters the flags: not part of the cached results' key
        self.layers = None if layers is None else [str(layer) for layer in layers]
        self.seed_images, self.levels, self.sample_k = int(seed_images), int(levels), float(sample_k)
        self.consistency, self.candidates, self.steps, self.lr = float(consistency), int(candidates), int(steps), float(lr)
        self.max_size, self.size_weight, self.others_weight = float(max_size), float(size_weight), float(others_weight)

    def settings(self) -> dict[str, Any]:
        return {"layers": self.layers, "seed_images": self.seed_images, "levels": self.levels, "sample_k": self.sample_k,
                "consistency": self.consistency, "candidates": self.candidates, "steps": self.steps, "lr": self.lr,
                "max_size": self.max_size, "size_weight": self.size_weight, "others_weight": self.others_weight}

    def flag(self, scores: Tensor) -> list[int]:
        return [k for k in super().flag(scores) if scores[k] >= self.min_reasr]

    def layers_of(self, model: Classifier) -> list[str]:
        """The named layers, or by default the last convolution and every linear layer after it but the head."""
        if self.layers is not None:
            return list(self.layers)
        modules = list(model.net.named_modules())
        try:
            last_conv = last_convolution(model)
        except ConfigError:
            raise ConfigError("defense.layers", "the model has no convolution for the default layers; name the "
                              f"layers (its layers are: {', '.join(model.layer_names())})") from None
        after = [name for name, _ in modules[[name for name, _ in modules].index(last_conv) + 1:]]
        linears = [name for name in after if isinstance(dict(modules)[name], nn.Linear)]
        return [last_conv, *linears[:-1]]

    def check_model(self, model: Classifier) -> None:
        if self.layers is not None and not self.layers:
            raise ConfigError("defense.layers", "is empty; name at least one layer, or null for the default")
        modules = dict(model.net.named_modules())
        for layer in self.layers_of(model):
            model.check_layer("defense.layers", layer)
            module = modules.get(layer)
            if not isinstance(module, CHANNELLED):
                raise ConfigError("defense.layers", f"{layer!r} is not a Conv2d, Linear or BatchNorm2d layer, whose "
                                  f"neurons ABS stimulates; name those (the last convolution is "
                                  f"{last_convolution(model)!r})")
            if self.candidates > channel_count(module):
                raise ConfigError("defense.candidates", f"got {self.candidates}, but layer {layer!r} has "
                                  f"{channel_count(module)} neurons; lower it")

    def score(self, model: nn.Module, images: ImageSet, num_classes: int, services: RunServices) -> dict[str, Tensor]:
        model.eval()
        device = model_device(model)
        seeds = to_float(images.images[:self.seed_images].to(device))
        seed_labels = images.labels[:self.seed_images]
        found: list[tuple[Tensor, str, Tensor, float]] = []  # per layer: margins, name, top neurons, peak
        for layer in self.layers_of(model):
            with torch.no_grad():
                peak = float(model.features(seeds, layer).amax().clamp_min(1e-6))
            values = torch.linspace(0.0, peak * self.sample_k, self.levels)
            margins = class_margins(stimulate(model, seeds, layer, values).cpu(), seed_labels, self.consistency)
            found.append((margins, layer, margins.topk(self.candidates, dim=0).indices, peak))
        # the candidates of each class: the largest margins for it over all layers
        pooled = torch.stack([margins.gather(0, top) for margins, _, top, _ in found])  # (layers, cand, classes)
        pooled = pooled.transpose(0, 1).flatten(0, 1)  # (cand x layers, classes), candidate-major
        order = pooled.topk(self.candidates, dim=0).indices.T  # (classes, candidates) into the pooled rows
        chosen_layer = order % len(found)
        chosen_rank = order // len(found)
        neuron = torch.empty(num_classes, self.candidates, dtype=torch.long)
        margin = torch.empty(num_classes, self.candidates)
        masks = torch.zeros(num_classes, self.candidates, 1, *seeds.shape[2:])
        patterns = torch.zeros(num_classes, self.candidates, *seeds.shape[1:])
        for index, (margins, layer, top, peak) in enumerate(found):
            here = (chosen_layer == index).nonzero()
            if not len(here):
                continue
            classes, slots = here[:, 0], here[:, 1]
            neuron[classes, slots] = top[chosen_rank[classes, slots], classes]
            margin[classes, slots] = margins[neuron[classes, slots], classes]
            mask, pattern = self.reverse_engineer(model, seeds, layer, neuron[classes, slots], peak)
            masks[classes, slots], patterns[classes, slots] = mask, pattern
        rest = ImageSet(images.images[self.seed_images:], images.labels[self.seed_images:])
        labels = torch.arange(num_classes).repeat_interleave(self.candidates)
        candidates = Trigger(masks.flatten(0, 1), patterns.flatten(0, 1), torch.zeros_like(patterns.flatten(0, 1)))
        reasr = holdout_success(model, candidates, rest, labels).view(num_classes, self.candidates)
        best = reasr.argmax(1)
        pick = torch.arange(num_classes)
        return {"score": reasr.amax(1), "mask": masks[pick, best], "pattern": patterns[pick, best],
                "delta": torch.zeros_like(patterns[pick, best]), "neuron": neuron[pick, best].float(),
                "layer": chosen_layer[pick, best].float(), "margin": margin[pick, best]}

    def reverse_engineer(self, model: nn.Module, seeds: Tensor, layer: str, neurons: Tensor,
                         peak: float = 1.0) -> tuple[Tensor, Tensor]:
        """ABS Alg. 2 for every candidate of one layer at once: ``(M, 1, H, W)`` masks and ``(M, C, H, W)``
        patterns. Activations (spatial means for convolutions) are divided by the layer's ``peak`` on
        the seeds, so one ``size_weight`` serves every layer."""
        count, (channels, height, width) = len(neurons), seeds.shape[1:]
        generator = torch.Generator().manual_seed(self.seed)
        # start from a small mask (sigmoid(-2) ~ 0.12) and a random pattern, as TrojanZoo's random init
        mask_logit = (torch.randn(count, 1, height, width, generator=generator) * 0.1 - 2.0).to(seeds.device)
        pattern_logit = torch.randn(count, channels, height, width, generator=generator).to(seeds.device)
        mask_logit.requires_grad_(True)
        pattern_logit.requires_grad_(True)
        optimizer = torch.optim.Adam([mask_logit, pattern_logit], lr=self.lr)
        index = neurons.to(seeds.device)
        for _ in range(self.steps):
            mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
            stamped = seeds[None] * (1 - mask[:, None]) + (mask * pattern)[:, None]  # (M, N, C, H, W)
            features = model.features(stamped.flatten(0, 1), layer)
            features = features.view(count, len(seeds), features.shape[1], -1).mean(3).mean(1) / peak
            target = features.gather(1, index[:, None]).squeeze(1)
            others = features.sum(1) - target
            size = mask.flatten(1).sum(1)
            weight = torch.where(size > 1.2 * self.max_size, 2 * self.size_weight,
                                 torch.where(size > self.max_size, self.size_weight, 0.01 * self.size_weight)).detach()
            loss = (-target + self.others_weight * others + weight * size).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return torch.sigmoid(mask_logit).detach().cpu(), torch.sigmoid(pattern_logit).detach().cpu()
