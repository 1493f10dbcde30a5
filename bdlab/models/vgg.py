"""CIFAR-style VGG with batch norm (Simonyan and Zisserman, 2015): five pooled stages, one linear head."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

_CONFIGS = {
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class _VGG(nn.Module):
    """Named layers: ``features.conv<stage>_<i>`` (with ``bn`` and ``relu`` of the same suffix),
    ``features.pool<stage>`` and ``head``; ``features.conv5_3`` (VGG-16) or ``conv5_4`` (VGG-19)
    is the last convolution."""

    def __init__(self, depth: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels, stage, index = in_channels, 1, 1
        for item in _CONFIGS[depth]:
            if item == "M":
                layers[f"pool{stage}"] = nn.MaxPool2d(2)
                stage, index = stage + 1, 1
            else:
                suffix = f"{stage}_{index}"
                layers[f"conv{suffix}"] = nn.Conv2d(channels, int(item), 3, padding=1)
                layers[f"bn{suffix}"] = nn.BatchNorm2d(int(item))
                layers[f"relu{suffix}"] = nn.ReLU()
                channels, index = int(item), index + 1
        self.features = nn.Sequential(layers)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


class VGG16BN(_VGG):
    """VGG-16 with batch norm; needs inputs of at least 32x32 (five 2x2 poolings)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, **_: object) -> None:
        super().__init__(16, in_channels, num_classes)


class VGG19BN(_VGG):
    """VGG-19 with batch norm (the ShrinkPad paper's CIFAR victim); needs inputs of at least 32x32."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, **_: object) -> None:
        super().__init__(19, in_channels, num_classes)
