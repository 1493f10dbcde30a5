"""Explanations: captum maps in pixel space, the attribution distance, the analyses end to end, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pytorch_lightning.loggers import WandbLogger
from torch import nn

from bdlab.analysis.explanations import AttributionDistance, GradCamMaps, SmoothGradMaps
from bdlab.attribution import METHODS, attribute, attribution_distance, grad_cam_layer, heatmap, mass_inside, normalise
from bdlab.compose import compose_config
from bdlab.errors import ConfigError
from bdlab.loggers import close_loggers
from bdlab.models.classifier import Classifier
from bdlab.models.lenet import LeNet
from bdlab.pipeline import execute, prepare
from tests.conftest import TINY_RUN
from tests.test_fine_pruning import Planted
from tests.test_transforms import shared_cache

FAST = {"samples": 4}


def lenet(mean: float = 0.5, std: float = 0.25) -> Classifier:
    torch.manual_seed(0)
    return Classifier(LeNet(in_channels=1, num_classes=3, input_size=(16, 16)), (mean,), (std,)).eval()


def planted(trojaned: bool) -> Classifier:
    """Fine-pruning's planted model (channel 2 fires on a white pixel and drives class 1); the clean
    twin's head ignores that channel."""
    net = Planted()
    if not trojaned:
        with torch.no_grad():
            net.head.weight[:, 2] = 0
    return Classifier(net, (0.0,), (1.0,)).eval()


def dark_pairs(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    clean = torch.full((n, 1, 4, 4), 20 / 255)
    triggered = clean.clone()
    triggered[:, :, 0, 0] = 1.0
    return clean, triggered


@pytest.mark.parametrize("method", METHODS)
def test_every_map_has_the_input_shape_and_is_not_zero(method: str) -> None:
    images = torch.rand(5, 1, 16, 16)
    maps = attribute(lenet(), images, torch.tensor([0, 1, 2, 0, 1]), method, batch_size=2, **FAST)
    assert maps.shape == images.shape and maps.dtype == torch.float32
    assert maps.abs().sum() > 0 and torch.isfinite(maps).all()
    rgb = torch.rand(2, 3, 8, 8)
    model = Classifier(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 2)),
                       (0.5,) * 3, (0.25,) * 3)
    assert attribute(model, rgb, 1, method, **FAST).shape == rgb.shape
    assert heatmap(attribute(model, rgb, 1, method, **FAST)).shape == (2, 8, 8)


@pytest.mark.parametrize("method", METHODS)
def test_gradients_flow_through_the_normalisation_wrapper(method: str) -> None:
    images = torch.rand(4, 1, 16, 16)
    torch.manual_seed(1)
    first = attribute(lenet(0.5, 0.25), images, 1, method, **FAST)
    torch.manual_seed(1)
    same = attribute(lenet(0.5, 0.25), images, 1, method, **FAST)
    torch.manual_seed(1)
    other = attribute(lenet(0.2, 0.5), images, 1, method, **FAST)
    assert first.abs().sum() > 0 and torch.allclose(first, same)
    assert not torch.allclose(first, other, rtol=1e-3, atol=1e-6)


def test_saliency_is_the_pixel_gradient_scaled_by_the_wrapper_std() -> None:
    # LeNet is piecewise linear: halving std with mean 0 doubles the input of the net, keeps the ReLU pattern
    # only for a linear net, so use one: y = w . ((x - m) / s) has |dy/dx| = |w| / s
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    images = torch.rand(3, 1, 4, 4)
    maps = [attribute(Classifier(net, (0.3,), (s,)), images, 1, "saliency") for s in (1.0, 0.5)]
    expected = net[1].weight[1].detach().abs().view(1, 1, 4, 4).expand(3, -1, -1, -1)
    assert torch.allclose(maps[0], expected) and torch.allclose(maps[1], 2 * expected)


def test_attribution_distance_on_hand_built_maps() -> None:
    a = torch.zeros(2, 4, 4)
    a[:, 0, 0] = 3.0
    assert attribution_distance(a, a).tolist() == [0.0, 0.0]
    assert attribution_distance(a, 5 * a).tolist() == [0.0, 0.0]  # maps are normalised to a maximum of 1
    b = torch.zeros(2, 4, 4)
    b[0, 1, 1] = 2.0  # another pixel: two pixels differ by 1 -> 2 / 16
    b[1] = 1.0  # the whole image against one pixel: 15 pixels differ by 1 -> 15 / 16
    assert attribution_distance(a, b) == pytest.approx(torch.tensor([12.5, 93.75]))
    assert attribution_distance(b, a) == pytest.approx(torch.tensor([12.5, 93.75]))
    assert attribution_distance(torch.zeros(1, 4, 4), torch.full((1, 4, 4), 0.5)).item() == pytest.approx(100.0)
    assert normalise(torch.zeros(1, 2, 2)).abs().sum() == 0
    assert mass_inside(b[:1], b[0] > 0).item() == pytest.approx(100.0)
    assert mass_inside(b[1:], b[0] > 0).item() == pytest.approx(100 / 16)
    with pytest.raises(ValueError):
        attribution_distance(a, torch.zeros(2, 4, 5))


@pytest.mark.parametrize("method", ["saliency", "smoothgrad"])
def test_target_class_distance_is_larger_on_a_planted_backdoor_than_on_its_clean_twin(method: str) -> None:
    clean, triggered = dark_pairs()
    distance = {}
    for trojaned in (True, False):
        model = planted(trojaned)
        maps = [heatmap(attribute(model, x, 1, method, samples=8, noise_std=0.02)) for x in (clean, triggered)]
        distance[trojaned] = attribution_distance(*maps).mean().item()
    # the trojaned model's class-1 evidence moves onto the trigger pixel; the clean twin's maps stay flat
    assert distance[True] > 80 and distance[False] < 10


def test_grad_cam_layer_is_the_last_convolution_or_a_named_one() -> None:
    model = lenet()
    assert grad_cam_layer(model, None, "f") == "conv2" and grad_cam_layer(model, "conv1", "f") == "conv1"
    with pytest.raises(ConfigError) as info:
        grad_cam_layer(model, "fc1", "analysis.grad_cam.layer")
    assert info.value.field == "analysis.grad_cam.layer" and "conv1, conv2" in str(info.value)
    with pytest.raises(ConfigError) as info:
        grad_cam_layer(model, "conv9", "analysis.grad_cam.layer")
    assert "conv9" in str(info.value) and "fc1" in str(info.value)  # the line lists the layers
    flat = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), (0.0,), (1.0,))
    with pytest.raises(ConfigError):
        grad_cam_layer(flat, None, "analysis.grad_cam.layer")
    with pytest.raises(ConfigError):
        GradCamMaps(layer="relu1").check_model(model)
    with pytest.raises(ConfigError):
        AttributionDistance(layer="head").check_model(model)
    AttributionDistance(method="saliency").check_model(flat)  # only Grad-CAM needs a convolution


@pytest.mark.parametrize("build, field", [
    (lambda: SmoothGradMaps(samples=0), "analysis.smoothgrad.samples"),
    (lambda: SmoothGradMaps(noise_std=0), "analysis.smoothgrad.noise_std"),
    (lambda: SmoothGradMaps(noise_std=-0.1), "analysis.smoothgrad.noise_std"),
    (lambda: SmoothGradMaps(scales=[0]), "analysis.smoothgrad.scales"),
    (lambda: SmoothGradMaps(angles=[400]), "analysis.smoothgrad.angles"),
    (lambda: AttributionDistance(method="smoothgrad", samples=0), "analysis.attribution_distance.samples"),
    (lambda: AttributionDistance(method="smoothgrad", noise_std=0), "analysis.attribution_distance.noise_std"),
    (lambda: AttributionDistance(method="lime"), "analysis.attribution_distance.method"),
    (lambda: AttributionDistance(images=0), "analysis.attribution_distance.images"),
    (lambda: AttributionDistance(method="saliency", layer="conv1"), "analysis.attribution_distance.layer"),
    (lambda: GradCamMaps(images=0), "analysis.grad_cam.images"),
])
def test_bad_values_are_refused(build, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert info.value.field == field and "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, field", [
    (["attack=none", "analysis=saliency"], "analysis.saliency"),
    (["attack=none", "analysis=attribution_distance"], "analysis.attribution_distance"),
    (["analysis=smoothgrad", "analysis.smoothgrad.samples=0"], "analysis.smoothgrad.samples"),
    (["analysis=smoothgrad", "analysis.smoothgrad.noise_std=0"], "analysis.smoothgrad.noise_std"),
])
def test_bad_values_are_refused_before_training(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, *overrides]))
    assert str(info.value).startswith(field)


def test_explanations_end_to_end_on_a_tiny_badnets_model(tmp_path: Path, tmp_path_factory) -> None:
    cfg = compose_config([*TINY_RUN, "attack.patch_size=4", "attack.poison_rate=0.2",
                          "analysis=[saliency,smoothgrad,grad_cam,attribution_distance]",
                          "analysis.saliency.max_images=20", "analysis.grad_cam.max_images=20",
                          "analysis.smoothgrad.max_images=10", "analysis.smoothgrad.samples=4",
                          "analysis.smoothgrad.images=4", "analysis.attribution_distance.images=40",
                          f"cache_dir={shared_cache(tmp_path_factory)}"])
    wandb = WandbLogger(project="bdlab", offline=True, save_dir=str(tmp_path))
    metrics = execute(prepare(cfg), tmp_path / "run", [wandb])["metrics"]
    close_loggers([wandb], "success")  # as the runner does: ends the W&B run, so the next test starts its own
    run = tmp_path / "run"
    for name in ("saliency", "smoothgrad", "grad_cam"):
        assert (run / name / f"{name}.png").stat().st_size > 0
        assert 0 <= metrics[f"analysis/{name}/trojan_target/trigger_mass"] <= 100
    for file in ("scale_0.8.png", "rotate_45.png"):
        assert (run / "smoothgrad" / file).stat().st_size > 0
    assert 0 <= metrics["analysis/smoothgrad/rotate_90/asr"] <= 100
    assert (run / "attribution_distance" / "attribution_distance.csv").stat().st_size > 0
    key = "analysis/attribution_distance"
    assert len(metrics[f"{key}/trojan_per_class"]) == 10
    assert metrics[f"{key}/trojan_target"] == metrics[f"{key}/trojan_per_class"][0]  # BadNets targets class 0
    # Table 19's ordering: the trigger moves the target class's evidence on the trojaned model only
    assert metrics[f"{key}/trojan_target"] > metrics[f"{key}/clean_target"]
    # on the trojaned model the trigger carries the target-class evidence
    assert metrics["analysis/saliency/trojan_target/trigger_mass"] > metrics["analysis/saliency/clean_target/trigger_mass"]
    assert list((tmp_path / "wandb").rglob("*.png")) or list((tmp_path / "wandb").rglob("*.wandb"))


@pytest.mark.parametrize("overrides, field", [
    (["analysis=grad_cam", "analysis.grad_cam.layer=fc1"], "analysis.grad_cam.layer"),
    (["analysis=grad_cam", "analysis.grad_cam.layer=conv9"], "analysis.grad_cam.layer"),
    (["analysis=attribution_distance", "analysis.attribution_distance.layer=relu2"],
     "analysis.attribution_distance.layer"),
])
def test_bad_grad_cam_layers_are_refused_before_training(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, *overrides]))
    assert info.value.field == field and "conv2" in str(info.value) and "\n" not in str(info.value)
