"""CIFAR-style VGG with batch norm (Simonyan and Zisserman, 2015): five pooled stages, one linear head."""

from __future__ import annotations

from torch import Tensor, nn

_CONFIGS = {
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class _VGG(nn.Module):
    def __init__(self, depth: int, in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in _CONFIGS[depth]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
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
