"""MagNet, NEO and SentiNet: scores on a planted backdoor, the cached autoencoder, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from bdlab.attacks.badnets import BadNets
from bdlab.cache import ArtifactCache
from bdlab.compose import compose_config
from bdlab.datasets.base import ImageSet, to_float
from bdlab.defenses.input_filtering.magnet import Autoencoder, MagNet
from bdlab.defenses.input_filtering.neo import NEO, blocker_masks, dominant_colours
from bdlab.defenses.input_filtering.sentinet import SentiNet, boundary_at, fit_boundary
from bdlab.errors import ConfigError
from bdlab.models.classifier import Classifier
from bdlab.pipeline import execute, prepare
from bdlab.services import RunServices
from tests.conftest import TINY_RUN, make_services, make_splits

TARGET = 2


class PlantedConv(nn.Module):
    """8x8 grey images behind a normalisation of std 0.5. One stride-2 2x2 convolution: channel 0 averages
    each 2x2 block (the task: class 0 when the top half is brighter, class 1 when the bottom is), channel 1
    sums it, more the more of the block's four pixels are white; the white bottom-right block (the trigger)
    drives class 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2, stride=2)
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.25, 1.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2))
            self.conv.bias.copy_(torch.tensor([0.0, -2.5]))

    def forward(self, x: Tensor) -> Tensor:
        maps = self.relu(self.conv(x))
        top, bottom = maps[:, 0, :2].mean((1, 2)), maps[:, 0, 2:].mean((1, 2))
        trigger = maps[:, 1].flatten(1).amax(1)
        return torch.stack([40 * (top - bottom), 40 * (bottom - top), 10 * trigger - 25], 1)


def planted_context(count: int = 60) -> tuple[RunServices, Tensor, Tensor]:
    """A context around the planted model (its own predictions as labels) and the clean and triggered images."""
    model = Classifier(PlantedConv(), (0.0,), (0.5,))
    images = torch.randint(0, 100, (count, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = model(to_float(images)).argmax(1)
    data = make_splits(images, labels, num_classes=3)
    attack = BadNets(patch_size=2, target_class=TARGET)
    attack.setup(data)
    context = make_services(data, attack, model, poisoned_test=attack.poison_test(data.test))
    triggered = attack.stamp(images)
    with torch.no_grad():
        assert (model(to_float(triggered)).argmax(1) == TARGET).all() and (labels != TARGET).all()
    return context, images, triggered


def test_dominant_colour_is_the_largest_cluster_and_blockers_reach_the_corner() -> None:
    x = torch.zeros(2, 3, 4, 4)
    x[0, :, :, :3] = torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1)  # 12 of 16 pixels one colour
    x[0, :, :, 3] = 1.0
    x[1] = 0.9
    x[1, :, 0, 0] = 0.0
    colours = dominant_colours(x, clusters=3)
    assert torch.allclose(colours[0], torch.tensor([0.2, 0.4, 0.6])) and torch.allclose(colours[1], torch.full((3,), 0.9))
    masks, sides = blocker_masks((8, 8), [3], stride=2)
    assert masks[-1, 0, 5:, 5:].all() and masks.sum((1, 2, 3)).eq(9).all()  # stride 2 from 0 misses row 5; kept
    assert len(masks) == 4 * 4 and sides.eq(3).all()


def test_neo_scores_triggered_inputs_above_clean_ones() -> None:
    context, images, triggered = planted_context()
    defense = NEO(block_sizes=[2, 3], stride=1, num_samples=40)
    clean_scores, triggered_scores = defense.scores(context, images), defense.scores(context, triggered)
    # blocking the white block removes class 2, and the block alone sends clean images there
    assert triggered_scores.min() > 0.9 and triggered_scores.min() > clean_scores.max()
    # sides as a fraction of the image (0.4 x 8 = 3 pixels): sizes are swept, never read from the attack
    fraction = NEO(block_sizes=[0.4], stride=1, num_samples=40).scores(context, triggered)
    assert fraction.min() > 0.9


def test_sentinet_scores_triggered_inputs_above_clean_ones_through_the_normalisation() -> None:
    context, images, triggered = planted_context()
    defense = SentiNet(num_overlays=30, boundary_images=30, bins=5)
    defense.check_model(context.trojan_model())  # layer null: the last (only) convolution
    x = to_float(triggered[:4])
    masks = defense.masks(context.trojan_model(), x, torch.full((4,), TARGET))
    # Grad-CAM through the std-0.5 normalisation lands on the 2x2 trigger block
    assert masks.shape == (4, 1, 8, 8) and masks[:, 0, 6:, 6:].all() and masks.sum() == 4 * 4
    clean_scores, triggered_scores = defense.scores(context, images), defense.scores(context, triggered)
    assert triggered_scores.min() > 0.5 and triggered_scores.min() > clean_scores.max()


def test_sentinet_boundary_is_the_clean_upper_envelope() -> None:
    confidence = torch.tensor([0.1, 0.15, 0.5, 0.55, 0.9, 0.95])
    fooled = torch.tensor([0.5, 0.7, 0.3, 0.1, 0.1, 0.0])
    coefficients = fit_boundary(confidence, fooled, bins=3, degree=2)
    # three bins, their maxima (0.15, 0.7), (0.5, 0.3), (0.9, 0.1): a quadratic through them
    assert boundary_at(coefficients, torch.tensor([0.15, 0.5, 0.9]), 0.1, 0.95).tolist() == \
        pytest.approx([0.7, 0.3, 0.1], abs=1e-4)
    assert boundary_at(coefficients, torch.tensor([2.0]), 0.1, 0.95).item() == \
        pytest.approx(boundary_at(coefficients, torch.tensor([0.95]), 0.1, 0.95).item())  # flat beyond the data


def smooth_images(count: int, size: int = 16, seed: int = 0) -> ImageSet:
    """Dark images with one soft bright blob each: the clean manifold the autoencoder learns."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(count, 2, generator=generator) * (size - 6) + 3
    grid = torch.arange(size).float()
    rows = (grid.view(1, -1, 1) - centres[:, 0].view(-1, 1, 1)) ** 2
    cols = (grid.view(1, 1, -1) - centres[:, 1].view(-1, 1, 1)) ** 2
    images = 200 * torch.exp(-(rows + cols) / 8)
    return ImageSet(images.round().to(torch.uint8)[:, None], torch.zeros(count, dtype=torch.long))


def test_magnet_autoencoder_learns_is_cached_and_reused_and_flags_off_manifold_inputs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = smooth_images(256)
    data = make_splits(train.images, train.labels)
    services = RunServices(compose_config(TINY_RUN), data, cache=ArtifactCache(tmp_path / "cache"))
    defense = MagNet(epochs=3, batch_size=32, lr=0.01, seed=0)
    before = torch.get_rng_state()
    model, losses, seconds = defense.autoencoder(services)
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0] and seconds > 0
    assert torch.equal(torch.get_rng_state(), before)  # trained under a forked RNG: the run's random state is kept
    assert len(list((tmp_path / "cache" / "autoencoders" / "magnet").glob("*/tensors.safetensors"))) == 1

    def no_training(*args, **kwargs) -> None:
        raise AssertionError("the cached autoencoder was trained again")

    monkeypatch.setattr(services, "fit_helper", no_training)
    again, _, seconds_again = defense.autoencoder(services)
    assert seconds_again == seconds  # the stored training time
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(AssertionError):  # other settings are another artifact
        MagNet(epochs=5, batch_size=32, lr=0.01).autoencoder(services)

    defense.autoencoder_model = model
    clean = to_float(smooth_images(64, seed=1).images)
    triggered = clean.clone()
    triggered[:, :, -3:, -3:] = 1.0  # BadNets' white corner patch
    noise = torch.rand(clean.shape, generator=torch.Generator().manual_seed(2))
    clean_error = defense.scores(services, clean)
    assert (defense.scores(services, triggered) > clean_error).float().mean() > 0.95
    assert defense.scores(services, noise).min() > clean_error.max()
    assert defense.reconstruct(clean).shape == clean.shape


@pytest.mark.parametrize("size", [28, 32, 16])
def test_autoencoder_takes_mnist_and_cifar_sizes(size: int) -> None:
    for channels in (1, 3):
        assert Autoencoder(channels)(torch.rand(2, channels, size, size)).shape == (2, channels, size, size)
    MagNet().setup(make_splits(torch.zeros(2, 3, size, size, dtype=torch.uint8), torch.zeros(2, dtype=torch.long)),
                   BadNets())


def test_magnet_reports_the_detector_and_the_reformer_end_to_end(tmp_path: Path) -> None:
    cfg = compose_config([*TINY_RUN, "defense=magnet", "defense.epochs=1", "dataset.train_size=600",
                          "trainer.max_epochs=2", f"cache_dir={tmp_path / 'cache'}"])
    metrics = execute(prepare(cfg), tmp_path / "run", [])["metrics"]
    for key in ("tpr", "fpr", "roc_auc", "acc", "asr", "ard", "cad", "acc_before", "asr_before", "art_s", "ae_loss",
                "reform_time_per_input_ms"):
        assert f"defense/{key}" in metrics, key
    assert metrics["defense/ard"] == pytest.approx(metrics["defense/asr_before"] - metrics["defense/asr"])
    assert metrics["defense/asr_before"] == pytest.approx(metrics["trojan/asr"])
    again = execute(prepare(cfg), tmp_path / "again", [])["metrics"]
    assert again["defense/art_s"] == metrics["defense/art_s"]  # the autoencoder came from the cache


def odd_splits(size: int = 15):
    return make_splits(torch.zeros(4, 1, size, size, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("make, field", [
    (lambda: MagNet(structure=["average"]), "defense.structure"),
    (lambda: MagNet(structure=[3, "median", 3]), "defense.structure"),
    (lambda: MagNet(structure=[0]), "defense.structure"),
    (lambda: MagNet(norm=3), "defense.norm"),
    (lambda: MagNet(noise=1.0), "defense.noise"),
    (lambda: MagNet(epochs=0), "defense.epochs"),
    (lambda: NEO(block_sizes=[]), "defense.block_sizes"),
    (lambda: NEO(block_sizes=[0]), "defense.block_sizes"),
    (lambda: NEO(block_sizes=[1.5]), "defense.block_sizes"),
    (lambda: NEO(stride=0), "defense.stride"),
    (lambda: NEO(num_samples=0), "defense.num_samples"),
    (lambda: SentiNet(mask_threshold=0.0), "defense.mask_threshold"),
    (lambda: SentiNet(mask_threshold=1.0), "defense.mask_threshold"),
    (lambda: SentiNet(num_overlays=0), "defense.num_overlays"),
    (lambda: SentiNet(fpr=1.0), "defense.fpr"),
])
def test_bad_values_are_refused_in_the_constructor(make, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        make()
    assert error.value.field == field and "\n" not in str(error.value)


def test_bad_values_against_the_data_and_model_are_refused() -> None:
    with pytest.raises(ConfigError) as error:
        MagNet().setup(odd_splits(15), BadNets())  # one pooling halves 15 pixels
    assert error.value.field == "defense.structure" and "15x15" in str(error.value)
    MagNet(structure=[3]).setup(odd_splits(15), BadNets())  # no pooling takes any size
    with pytest.raises(ConfigError) as error:
        NEO(block_sizes=[3, 16]).setup(odd_splits(15), BadNets())
    assert error.value.field == "defense.block_sizes"
    with pytest.raises(ConfigError) as error:
        NEO(num_samples=5).setup(odd_splits(15), BadNets())  # held-out split: 4
    assert error.value.field == "defense.num_samples"
    with pytest.raises(ConfigError) as error:
        SentiNet(num_overlays=2, boundary_images=3).setup(odd_splits(15), BadNets())
    assert error.value.field == "defense.boundary_images"
    model = Classifier(PlantedConv(), (0.0,), (0.5,))
    with pytest.raises(ConfigError) as error:
        SentiNet(layer="relu").check_model(model)
    assert error.value.field == "defense.layer" and "conv" in str(error.value)
    with pytest.raises(ConfigError) as error:
        SentiNet(layer="conv9").check_model(model)
    assert error.value.field == "defense.layer" and "conv, relu" in str(error.value)


@pytest.mark.parametrize("overrides, field", [
    (["defense=magnet", "dataset.size=15"], "defense.structure"),
    (["defense=sentinet", "defense.layer=fc1", "defense.num_overlays=5", "defense.boundary_images=5"], "defense.layer"),
    (["defense=neo", "defense.block_sizes=[3,40]", "defense.num_samples=5"], "defense.block_sizes"),
])
def test_bad_values_are_refused_by_prepare(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as error:
        prepare(compose_config([*TINY_RUN, *overrides]))
    assert error.value.field == field
