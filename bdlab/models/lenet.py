"""LeNet-5 (LeCun et al., 1998) with ReLU and max-pooling, the MNIST victim of the backdoor literature."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LeNet(nn.Module):
    """conv5x5(6, pad 2) - pool - conv5x5(16) - pool - fc(120) - fc(84) - fc(classes).

    The MNIST victim of "Why is your Trojan NOT responding?" (Table 2: 99.13% clean accuracy)
    and of the ShrinkPad paper. Works for any input of at least 12x12 pixels.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: tuple[int, int] = (28, 28)) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten())
        with torch.no_grad():
            flat = self.features(torch.zeros(1, in_channels, *input_size)).shape[1]
        self.fc = nn.Sequential(nn.Linear(flat, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True))
        self.head = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.fc(self.features(x)))
