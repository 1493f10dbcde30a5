"""Each model's forward at its dataset's size; the wrapper's normalisation and feature hook."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from bdlab.errors import ConfigError
from bdlab.models import (VGG16BN, VGG19BN, LeNet, PreActResNet18, ResNet18, ResNet34, build_classifier,
                          torchvision_model)


@pytest.mark.parametrize("factory, shape, classes", [
    (LeNet, (1, 28, 28), 10),
    (LeNet, (3, 32, 32), 43),
    (ResNet18, (3, 32, 32), 10),
    (ResNet34, (3, 32, 32), 100),
    (PreActResNet18, (3, 32, 32), 10),
    (VGG16BN, (3, 32, 32), 10),
    (VGG19BN, (3, 32, 32), 43),
    (partial(torchvision_model, "resnet18"), (3, 64, 64), 10),
    (partial(torchvision_model, "mobilenet_v3_small"), (1, 64, 64), 5),
])
def test_forward_at_dataset_size(factory, shape, classes) -> None:
    model = build_classifier(factory, shape, classes, (0.5,) * shape[0], (0.25,) * shape[0])
    out = model(torch.rand(3, *shape))
    assert out.shape == (3, classes) and torch.isfinite(out).all()
    features = model.penultimate(torch.rand(3, *shape))
    assert features.shape[0] == 3 and features.shape[1] == model.last_linear().in_features


def test_normalisation_lives_in_the_wrapper() -> None:
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self, **_: object) -> None:
            super().__init__()
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            seen.append(x.clone())
            return self.head(x.flatten(1))

    model = build_classifier(Probe, (1, 2, 2), 2, (0.5,), (0.25,))
    seen.clear()
    model(torch.full((1, 1, 2, 2), 0.75))
    assert torch.allclose(seen[0], torch.full((1, 1, 2, 2), 1.0))


def test_model_that_cannot_take_the_input() -> None:
    with pytest.raises(ConfigError, match="cannot take the dataset's 3x16x16 input"):
        build_classifier(VGG16BN, (3, 16, 16), 10, (0.5,) * 3, (0.25,) * 3)


def test_unknown_torchvision_model() -> None:
    with pytest.raises(ConfigError, match="model.net.name"):
        build_classifier(partial(torchvision_model, "resnet9000"), (3, 64, 64), 10, (0.5,) * 3, (0.25,) * 3)
