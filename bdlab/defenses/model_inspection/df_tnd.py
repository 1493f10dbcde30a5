"""DF-TND (Wang et al., ECCV 2020): data-free detection from the logit increase sparse perturbations of noise can buy."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bdlab.datasets.base import ImageSet, to_float
from bdlab.defenses.model_inspection.base import ModelInspection
from bdlab.errors import ConfigError, check_at_least
from bdlab.evaluate import model_device
from bdlab.services import RunServices

SEEDS = ("noise", "images")


class DFTND(ModelInspection):
    """DF-TND, data-free Trojan network detection (Wang et al., "Practical Detection of Trojan Neural
    Networks: Data-Limited and Data-Free Cases", ECCV 2020, §4, Eq. 6-7).

    The paper's observation: a backdoor gives its target label a shortcut, so a *sparse* perturbation
    of arbitrary inputs, even random noise, raises the target's logit far more than any other
    label's. Per class ``k`` one perturbation ``delta_k`` (universal over the inputs) is found by Adam
    (``steps``, ``lr``) on::

        min_delta  -mean_x [ f_k(clip(x + delta)) - f_k(x) ]  +  l1_weight * ||delta||_1

    starting from zero, over ``seed_count`` inputs: uniform noise (``seeds: noise``, the data-free
    case) or the first held-out images (``seeds: images``, closer to the paper's data-limited setting;
    on MNIST / LeNet vs BadNets it does not single out the target at these settings, noise does). The
    per-class score is the detection statistic, the mean logit increase ``f_k(x + delta_k) - f_k(x)``
    measured on *other* inputs (fresh noise, or the held-out images after the seeds). A target class
    is an abnormally *high* logit increase; the protocol's anomaly index (AIV > ``aiv_threshold``,
    above the median) flags it, where the paper thresholds the statistic.

    Partly implemented: the paper maximises each neuron of the feature (penultimate) layer and reads
    which label's logit the recovered perturbations raise; here each class's logit is maximised
    directly (the same statistic, one optimisation per class instead of per neuron, all classes in
    one batch). The recovered perturbations are reported as triggers (#pixels, MLN of their
    footprint and held-out ASR).

    Args:
        seeds: ``noise`` (default, data-free) or ``images`` (held-out images).
        seed_count: inputs the perturbations are optimised on (default 20); as many further inputs
            measure the statistic.
        steps, lr: Adam steps and step size (default 100, 0.02).
        l1_weight: weight of the perturbation's L1 norm (default 0.05; sparsity: on MNIST / LeNet it
            keeps ~1/3 of the pixels; 0.2 leaves almost every class at a zero perturbation and a
            degenerate anomaly index, 0.01 a dense one).
        optimisation_images, evaluation_images, aiv_threshold, seed: as
            :class:`~bdlab.defenses.model_inspection.base.ModelInspection`
            (defaults 100, 200, 2).
    """

    name = "df_tnd"
    suspicious = "high"
    recovers_trigger = False  # logit-raising perturbations of noise, not a trigger of the images to unlearn

    def __init__(self, seeds: str = "noise", seed_count: int = 20, steps: int = 100, lr: float = 0.02,
                 l1_weight: float = 0.05, optimisation_images: int = 100, evaluation_images: int = 200,
                 aiv_threshold: float = 2.0, seed: int = 0) -> None:
        super().__init__(optimisation_images, evaluation_images, aiv_threshold, seed)
        if seeds not in SEEDS:
            raise ConfigError("defense.seeds", f"got {seeds!r}, must be one of {', '.join(SEEDS)}")
        check_at_least("defense.seed_count", seed_count, 1)
        if seeds == "images" and 2 * seed_count > optimisation_images:
            raise ConfigError("defense.seed_count", f"got {seed_count}: seeds: images needs twice as many held-out "
                              f"images (optimisation, then measurement), but defense.optimisation_images is "
                              f"{optimisation_images}; lower it or raise defense.optimisation_images")
        check_at_least("defense.steps", steps, 1)
        if not lr > 0:
            raise ConfigError("defense.lr", f"got {lr}, must be > 0")
        check_at_least("defense.l1_weight", l1_weight, 0)
        self.seeds, self.seed_count, self.steps = seeds, int(seed_count), int(steps)
        self.lr, self.l1_weight = float(lr), float(l1_weight)

    def settings(self) -> dict[str, Any]:
        return {"seeds": self.seeds, "seed_count": self.seed_count, "steps": self.steps, "lr": self.lr,
                "l1_weight": self.l1_weight}

    def inputs(self, images: ImageSet) -> tuple[Tensor, Tensor]:
        """The inputs the perturbations are optimised on, and the disjoint ones the statistic is read on."""
        if self.seeds == "images":
            x = to_float(images.images[:2 * self.seed_count])
        else:
            generator = torch.Generator().manual_seed(self.seed)
            x = torch.rand(2 * self.seed_count, *images.images.shape[1:], generator=generator)
        return x[:self.seed_count], x[self.seed_count:]

    def score(self, model: nn.Module, images: ImageSet, num_classes: int, services: RunServices) -> dict[str, Tensor]:
        model.eval()
        device = model_device(model)
        fit_inputs, read_inputs = (x.to(device) for x in self.inputs(images))
        delta = torch.zeros(num_classes, *fit_inputs.shape[1:], device=device, requires_grad=True)
        optimizer = torch.optim.Adam([delta], lr=self.lr)
        classes = torch.arange(num_classes, device=device)
        with torch.no_grad():
            base = model(fit_inputs)[:, classes]  # (N, K)
        for _ in range(self.steps):
            increase = self.logit_increase(model, fit_inputs, delta, base)
            loss = (-increase + self.l1_weight * delta.abs().flatten(1).sum(1)).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        delta = delta.detach()
        with torch.no_grad():
            statistic = self.logit_increase(model, read_inputs, delta, model(read_inputs)[:, classes])
        return {"score": statistic, "mask": torch.zeros(num_classes, 1, *delta.shape[2:]),
                "pattern": torch.zeros_like(delta), "delta": delta,
                "l1": delta.abs().flatten(1).sum(1)}

    @staticmethod
    def logit_increase(model: nn.Module, x: Tensor, delta: Tensor, base: Tensor) -> Tensor:
        """``(K,)``: the mean over ``x`` of class ``k``'s logit gain under ``delta[k]`` (all classes in one batch)."""
        count, classes = len(x), len(delta)
        stamped = (x[None] + delta[:, None]).clamp(0.0, 1.0).flatten(0, 1)  # class-major
        logits = model(stamped).view(classes, count, -1)
        index = torch.arange(classes, device=logits.device)
        own = logits[index, :, index]  # (K, N)
        return (own - base.T).mean(1)
