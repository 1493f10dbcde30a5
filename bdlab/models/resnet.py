"""CIFAR-style ResNets (He et al., 2016) and PreAct ResNet-18 (He et al., 2016b).

3x3 stem without max-pool, as every backdoor benchmark uses for 32x32 inputs; global average
pooling makes them accept any input of at least 8x8 pixels. Named layers: ``stem``, ``stem_bn``
(not in PreAct), the stages ``layer1`` ... ``layer4`` (torchvision's names; ``layer4.1.conv2`` is
the last convolution), ``final_bn`` (PreAct only) and ``head``.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + shortcut


class _ResNet(nn.Module):
    def __init__(self, block: type[nn.Module], layers: list[int], in_channels: int, num_classes: int,
                 width: int = 64, preact: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.stem_bn = None if preact else nn.BatchNorm2d(width)
        in_planes = width
        for i, blocks in enumerate(layers):
            planes = width * 2 ** i
            stage = []
            for j in range(blocks):
                stage.append(block(in_planes, planes, 2 if (j == 0 and i > 0) else 1))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(layers)
        self.final_bn = nn.BatchNorm2d(in_planes) if preact else None
        self.head = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.stem(x)
        if self.stem_bn is not None:
            out = F.relu(self.stem_bn(out))
        for i in range(1, self.num_stages + 1):
            out = getattr(self, f"layer{i}")(out)
        if self.final_bn is not None:
            out = F.relu(self.final_bn(out))
        return self.head(F.adaptive_avg_pool2d(out, 1).flatten(1))


class ResNet18(_ResNet):
    """CIFAR ResNet-18: [2, 2, 2, 2] basic blocks, widths 64-512 (``width`` scales them)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64, **_: object) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], in_channels, num_classes, width)


class ResNet34(_ResNet):
    """CIFAR ResNet-34: [3, 4, 6, 3] basic blocks, widths 64-512."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64, **_: object) -> None:
        super().__init__(BasicBlock, [3, 4, 6, 3], in_channels, num_classes, width)


class PreActResNet18(_ResNet):
    """PreAct ResNet-18 (BackdoorBench's default CIFAR victim): [2, 2, 2, 2] pre-activation blocks."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64, **_: object) -> None:
        super().__init__(PreActBlock, [2, 2, 2, 2], in_channels, num_classes, width, preact=True)
