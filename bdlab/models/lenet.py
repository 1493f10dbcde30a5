"""LeNet-5 (LeCun et al., 1998) with ReLU and max-pooling, the MNIST victim of the backdoor literature."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LeNet(nn.Module):
    """conv5x5(6, pad 2) - pool - conv5x5(16) - pool - fc(120) - fc(84) - fc(classes).

    The MNIST victim of "Why is your Trojan NOT responding?" (Table 2: 99.13% clean accuracy)
    and of the ShrinkPad paper. Works for any input of at least 12x12 pixels. Named layers, in
    order: ``conv1, relu1, pool1, conv2, relu2, pool2, fc1, relu3, fc2, relu4, head``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: tuple[int, int] = (28, 28)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        with torch.no_grad():
            flat = self._convolutions(torch.zeros(1, in_channels, *input_size)).shape[1]
        self.fc1 = nn.Linear(flat, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.head = nn.Linear(84, num_classes)

    def _convolutions(self, x: Tensor) -> Tensor:
        return self.pool2(self.relu2(self.conv2(self.pool1(self.relu1(self.conv1(x)))))).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.relu4(self.fc2(self.relu3(self.fc1(self._convolutions(x))))))
