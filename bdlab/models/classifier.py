"""The wrapper every victim runs inside: pixel-space input, normalisation, penultimate features."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bdlab.errors import ConfigError


class Classifier(nn.Module):
    """Takes float images in ``[0, 1]``, normalises them with the dataset's statistics, runs ``net``.

    Keeping normalisation here means triggers, transforms and metrics all live in pixel space.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std)

    def last_linear(self) -> nn.Linear:
        linears = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise TypeError("the network has no nn.Linear head to read penultimate features from")
        return linears[-1]

    def penultimate(self, x: Tensor) -> Tensor:
        """The input of the last linear layer (the features spectral signatures and AC read)."""
        captured: list[Tensor] = []
        handle = self.last_linear().register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
        try:
            self(x)
        finally:
            handle.remove()
        return captured[0].flatten(1)


def build_classifier(net_factory: Callable[..., nn.Module], input_shape: tuple[int, int, int], num_classes: int,
                     mean: Sequence[float], std: Sequence[float]) -> Classifier:
    """Instantiate the backbone for this dataset and check it accepts the dataset's images."""
    channels, height, width = input_shape
    try:
        net = net_factory(in_channels=channels, num_classes=num_classes, input_size=(height, width))
        model = Classifier(net, mean, std)
        model.eval()
        with torch.no_grad():
            out = model(torch.zeros(2, channels, height, width))
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError("model", f"cannot take the dataset's {channels}x{height}x{width} input ({error}); "
                          "pick a model for this input size") from error
    if out.shape != (2, num_classes):
        raise ConfigError("model", f"outputs {tuple(out.shape[1:])} for {num_classes} classes")
    return model
