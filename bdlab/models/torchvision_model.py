"""Any torchvision classification model by name, randomly initialised (no weights are downloaded)."""

from __future__ import annotations

import torchvision
from torch import Tensor, nn

from bdlab.errors import ConfigError


class _RepeatChannels(nn.Module):
    """Feeds grey images to RGB architectures by repeating the channel."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.expand(-1, 3, -1, -1))


def torchvision_model(name: str, in_channels: int = 3, num_classes: int = 10, **kwargs: object) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=...)``; grey input is repeated to RGB."""
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ConfigError("model.net.name", f"unknown torchvision model {name!r}; choose one of "
                          "torchvision.models.list_models(), e.g. resnet50, vit_b_16, efficientnet_b0")
    kwargs.pop("input_size", None)
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels == 1:
        return _RepeatChannels(net)
    if in_channels != 3:
        raise ConfigError("model.net", f"torchvision models take 1 or 3 channels, the dataset has {in_channels}")
    return net
