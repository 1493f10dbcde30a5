"""DFST's controlled detoxification (Cheng, Liu, Ma and Zhang, "Deep Feature Space Trojan Attack of Neural
Networks by Controlled Detoxification", AAAI 2021, §"Controlled Detoxification"), in a simplified form.

The pieces of one round: :func:`compromised_neurons` finds the neurons of a layer that the stylised inputs
elevate most; a :class:`FeatureInjector`, trained by :class:`InjectorModule` against the frozen model, learns
a small bounded change of clean images that drives those neurons up (the simple features the backdoor
latched on to); its outputs, with their true labels, are the detoxicants the model is retrained with.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bdlab.attacks.stegastamp import SSIM
from bdlab.datasets.base import to_float
from bdlab.models.classifier import Classifier
from bdlab.nsr import layer_activations
from bdlab.training.loader import BatchedModule, TensorBatches

#: the injector's loss factors: keeping the other neurons of the layer where they were, and SSIM to the input
KEEP_WEIGHT = 1.0
SSIM_WEIGHT = 1.0
INJECTOR_LR = 1e-3


def compromised_neurons(model: Classifier, clean: Tensor, stylised: Tensor, layer: str, count: int) -> Tensor:
    """The ``count`` neurons of ``layer`` (channels averaged over space) whose mean activation rises most from
    the uint8 ``clean`` images to their ``stylised`` versions (DFST's compromised neurons: those elevated by
    the trigger), sorted by index."""
    elevation = layer_activations(model, stylised, layer).mean(0) - layer_activations(model, clean, layer).mean(0)
    return elevation.topk(count).indices.sort().values


def _pooled(activations: Tensor) -> Tensor:
    return activations.mean((2, 3)) if activations.dim() == 4 else activations.flatten(1)


class FeatureInjector(nn.Module):
    """DFST's feature injector, as a three-layer convolutional network adding a bounded residual:
    ``clamp(x + bound * tanh(net(x)), 0, 1)``. Its last layer starts at zero, so it starts as the identity.

    Args:
        channels: the images' channels.
        width: hidden channels (default 16).
        bound: the largest change of a pixel, in ``[0, 1]`` units (DFST's attack config: ``detox_bound``).
    """

    def __init__(self, channels: int, width: int = 16, bound: float = 0.1) -> None:
        super().__init__()
        self.bound = bound
        self.net = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True),
                                 nn.Conv2d(width, channels, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return (x + self.bound * torch.tanh(self.net(x * 2 - 1))).clamp(0.0, 1.0)


class InjectorModule(BatchedModule):
    """Trains a :class:`FeatureInjector` against a frozen classifier (its weights and batch-norm statistics
    untouched; Adam at :data:`INJECTOR_LR` on the injector alone):

    ``L = -mean(a_c(x')) + KEEP_WEIGHT * mean((a_o(x') - a_o(x))^2) + SSIM_WEIGHT * (1 - SSIM(x', x))``

    with ``x' = injector(x)``, ``a_c`` the compromised neurons of ``layer`` and ``a_o`` the others: the
    injected feature raises the compromised neurons alone, and stays close to the clean image.
    """

    def __init__(self, injector: FeatureInjector, model: Classifier, layer: str, neurons: Tensor,
                 batches: TensorBatches, size: tuple[int, int]) -> None:
        super().__init__(batches)
        self.injector, self.layer = injector, layer
        self._frozen = (model,)  # a tuple, so Lightning neither trains it nor switches it to train mode
        self.neurons = neurons
        self.ssim = SSIM(size)
        self.last: dict[str, float] = {}

    @property
    def model(self) -> Classifier:
        return self._frozen[0]

    def on_fit_start(self) -> None:
        self.model.to(self.device).eval().requires_grad_(False)

    def on_fit_end(self) -> None:
        self.model.requires_grad_(True)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x = to_float(batch[0])
        injected = self.injector(x)
        with torch.no_grad():
            before = _pooled(self.model.features(x, self.layer))
        after = _pooled(self.model.features(injected, self.layer))
        chosen = torch.zeros(after.shape[1], dtype=torch.bool, device=after.device)
        chosen[self.neurons.to(after.device)] = True
        elevation = after[:, chosen].mean()
        keep = (after[:, ~chosen] - before[:, ~chosen]).pow(2).mean() if bool((~chosen).any()) else after.new_zeros(())
        similarity = 1.0 - self.ssim(injected, x)
        loss = -elevation + KEEP_WEIGHT * keep + SSIM_WEIGHT * similarity
        self.last = {"elevation": float(elevation.detach()), "keep": float(keep.detach()),
                     "ssim_loss": float(similarity.detach())}
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.injector.parameters(), lr=INJECTOR_LR)
