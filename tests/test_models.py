"""Each model's forward at its dataset's size; the wrapper's normalisation and feature hook."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from bdlab.errors import ConfigError
from bdlab.models import (
    VGG16BN,
    VGG19BN,
    LeNet,
    PreActResNet18,
    ResNet18,
    ResNet34,
    build_classifier,
    torchvision_model,
)


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


@pytest.mark.parametrize("factory, shape, layer, channels", [
    (LeNet, (1, 28, 28), "conv2", 16),
    (ResNet18, (3, 32, 32), "layer4.1.conv2", 512),
    (ResNet34, (3, 32, 32), "layer3", 256),
    (PreActResNet18, (3, 32, 32), "layer2", 128),
    (VGG16BN, (3, 32, 32), "features.conv5_3", 512),
    (VGG19BN, (3, 32, 32), "features.conv5_4", 512),
    (partial(torchvision_model, "resnet18"), (3, 64, 64), "layer4", 512),
])
def test_features_of_named_layers_for_every_backbone(factory, shape, layer, channels) -> None:
    model = build_classifier(factory, shape, 10, (0.5,) * shape[0], (0.25,) * shape[0])
    x = torch.rand(2, *shape, requires_grad=True)
    out = model.features(x, [layer, "penultimate", "logits"])
    assert out[layer].shape[:2] == (2, channels)
    assert torch.equal(out["logits"], model(x)) and out["penultimate"].shape == (2, model.last_linear().in_features)
    assert torch.equal(model.features(x, layer), out[layer])
    out[layer].sum().backward()  # gradients flow through the normalisation wrapper to the input
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer in model.layer_names() and {"penultimate", "logits"} <= set(model.layer_names())


def test_a_captured_layer_keeps_its_values_before_an_in_place_activation() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.ReLU(inplace=True), torch.nn.Flatten(),
                              torch.nn.Linear(2 * 4 * 4, 3))
    with torch.no_grad():
        net[0].weight.fill_(-1.0)
        net[0].bias.zero_()
    model = build_classifier(lambda **_: net, (1, 4, 4), 3, (0.0,), (1.0,))
    x = torch.rand(1, 1, 4, 4) + 0.1
    expected = -x.expand(1, 2, 4, 4)  # all negative: the in-place ReLU would turn them into 0
    assert torch.allclose(model.features(x, "0"), expected)


def test_unknown_layer_names_the_field_and_lists_the_layers() -> None:
    model = build_classifier(LeNet, (1, 28, 28), 10, (0.5,), (0.25,))
    with pytest.raises(ConfigError) as error:
        model.check_layer("attack.layer", "conv9")
    assert error.value.field == "attack.layer" and "conv1, relu1, pool1, conv2" in str(error.value)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="its layers are: conv1"):
        model.features(torch.rand(1, 1, 28, 28), "conv9")
