"""DFST: the procedural style domain, the CycleGAN generator's cache and learned state, poisoning,
controlled detoxification on a tiny model, and bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from bdlab.attacks.cyclegan import PatchDiscriminator, StyleGenerator
from bdlab.attacks.detox import FeatureInjector, InjectorModule, compromised_neurons
from bdlab.attacks.dfst import DFST
from bdlab.attacks.style_domain import load_style_folder, sunrise
from bdlab.datasets.base import to_float
from bdlab.errors import ConfigError
from bdlab.models.classifier import Classifier
from bdlab.run import cli
from bdlab.services import create
from bdlab.training.fit import fit
from bdlab.training.loader import TensorBatches
from bdlab.training.recipe import TrainingRecipe
from tests.test_bad_input import assert_refused

# 16x16 RGB gratings, LeNet, one epoch; a CycleGAN of width 4 with one block, 64 image pairs, 4 steps
TINY_DATA = ["dataset=synthetic", "dataset.size=16", "dataset.train_size=200", "dataset.test_size=40", "model=lenet",
             "trainer.max_epochs=1", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger=none"]
TINY_GENERATOR = {"style_images": 64, "generator_epochs": 1, "generator_width": 4, "generator_blocks": 1}
TINY_DFST = [*TINY_DATA, "attack=dfst", *(f"attack.{key}={value}" for key, value in TINY_GENERATOR.items())]
RECIPE = {"max_epochs": 1, "accelerator": "cpu", "devices": 1, "enable_progress_bar": False}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """The tiny generator, trained through the attack of prepared services, and test images it stylised."""
    root = tmp_path_factory.mktemp("dfst-cache")
    services = create([*TINY_DFST, f"cache_dir={root}"])
    attack = services.attack
    images = services.data.test.images[:32]
    return {"root": root, "services": services, "attack": attack, "images": images, "stylised": attack.stamp(images)}


# ----------------------------------------------------------------------------- the style domain

def test_sunrise_warms_darkens_the_corners_and_is_seeded() -> None:
    grey = torch.full((4, 3, 16, 16), 128, dtype=torch.uint8)
    styled = to_float(sunrise(grey, seed=0))
    red, blue = styled[:, 0].mean(), styled[:, 2].mean()
    assert red > 128 / 255 + 0.05 > 128 / 255 - 0.05 > blue  # warm: red up, blue down
    luma = styled.mean(1)
    assert luma[:, :2, :2].mean() < luma[:, 6:10, 6:10].mean() - 0.05  # vignette
    assert torch.equal(sunrise(grey, 0), sunrise(grey, 0)) and not torch.equal(sunrise(grey, 0), sunrise(grey, 1))
    assert sunrise(torch.full((2, 1, 8, 8), 128, dtype=torch.uint8), 0).shape == (2, 1, 8, 8)


def test_procedural_domain_is_seeded(trained) -> None:
    attack = trained["attack"]
    content, style = attack.domains()
    again_content, again_style = attack.domains()
    assert torch.equal(content, again_content) and torch.equal(style, again_style)
    assert len(content) == len(style) == TINY_GENERATOR["style_images"]
    assert to_float(style)[:, 0].mean() > to_float(content)[:, 0].mean()  # the style's warm tint
    other = create([*TINY_DFST, "seed=1", f"cache_dir={trained['root']}"]).attack
    assert not torch.equal(other.domains()[1], style)


def test_style_folder_is_read_and_resized(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "style" / "deeper").mkdir(parents=True)
    Image.new("RGB", (40, 30), (250, 120, 20)).save(tmp_path / "style" / "a.png")
    Image.new("L", (20, 20), 200).save(tmp_path / "style" / "deeper" / "b.jpg")
    images = load_style_folder(tmp_path / "style", 3, (16, 16))
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    assert images[0, :, 8, 8].tolist() == [250, 120, 20]


# ----------------------------------------------------------------------------- the generator

def test_the_trojan_key_follows_the_style_images_not_their_folder(tmp_path: Path) -> None:
    """A moved style folder keeps the trojaned model's cache key; an edited image changes it."""
    from PIL import Image

    from bdlab.compose import compose_config
    from bdlab.services import attack_spec

    def key(folder: Path) -> dict:
        return attack_spec(compose_config([*TINY_DFST, f"attack.style_root={folder}"]).attack)

    for name in ("here", "there"):
        (tmp_path / name / "sub").mkdir(parents=True)
        Image.new("RGB", (20, 20), (250, 120, 20)).save(tmp_path / name / "sub" / "a.png")
    assert key(tmp_path / "here") == key(tmp_path / "there")
    assert str(tmp_path) not in str(key(tmp_path / "here"))
    Image.new("RGB", (20, 20), (250, 120, 21)).save(tmp_path / "there" / "sub" / "a.png")
    assert key(tmp_path / "here") != key(tmp_path / "there")


def test_networks_keep_shape_and_range() -> None:
    for size in ((8, 8), (16, 16), (15, 21)):
        x = torch.rand(2, 3, *size)
        y = StyleGenerator(3, 4, 1)(x)
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
        assert PatchDiscriminator(3, 4)(x).shape[:2] == (2, 1)


def test_generator_is_cached_and_restored_bit_exactly(trained, tmp_path: Path) -> None:
    attack, images, stylised = trained["attack"], trained["images"], trained["stylised"]
    assert attack.generator_builds == 1
    state = attack.state_dict()
    assert set(state) == {f"generator.{k}" for k in StyleGenerator(3, 4, 1).state_dict()}
    # a second run with the same settings and data reads the generator from the cache, bit for bit
    again = create([*TINY_DFST, f"cache_dir={trained['root']}"]).attack
    assert torch.equal(again.stamp(images), stylised) and again.generator_builds == 0
    assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
    # the state stored with the trojaned model restores it without the cache
    fresh = create([*TINY_DFST, f"cache_dir={tmp_path / 'empty'}"]).attack
    assert not all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())  # untrained differs
    fresh.load_state_dict(state)
    assert torch.equal(fresh.stamp(images), stylised) and fresh.generator_builds == 0
    with pytest.raises(KeyError):
        fresh.load_state_dict({k: v for k, v in state.items() if ".tail." not in k})
    # any setting of the generator re-keys it
    content, style = attack.domains()
    longer = create([*TINY_DFST, "attack.generator_epochs=2", f"cache_dir={tmp_path / 'empty'}"]).attack
    assert longer.generator_spec(content, style) != attack.generator_spec(content, style)


def test_poisons_are_stylised_and_relabelled(trained) -> None:
    attack, services = trained["attack"], trained["services"]
    train = services.data.train
    poisoned = attack.poison_train(train)
    index = attack.poison_indices(train.labels)
    others = torch.ones(len(train), dtype=torch.bool)
    others[index] = False
    assert torch.equal(poisoned.images[index], attack.stamp(train.images[index]))
    assert (poisoned.images[index].float() - train.images[index].float()).abs().mean() > 5  # really changed
    assert bool((poisoned.labels[index] == attack.target_class).all()) and bool((train.labels[index] != 0).all())
    assert torch.equal(poisoned.images[others], train.images[others])
    assert torch.equal(poisoned.labels[others], train.labels[others]) and torch.equal(poisoned.is_poison, ~others)
    test = attack.poison_test(services.data.test)
    assert torch.equal(test.images, attack.stamp(services.data.test.images[test.sources]))
    assert attack.report(services.data.test, test) == {"attack/procedural_style": 1.0}


# ----------------------------------------------------------------------------- detoxification

class ChannelMeans(nn.Module):
    """A toy backbone whose penultimate neurons are the three colour channels' means."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(x)))


def toy_model() -> Classifier:
    return Classifier(ChannelMeans(), (0.0,) * 3, (1.0,) * 3)


def test_compromised_neurons_are_the_ones_the_style_raises() -> None:
    clean = torch.full((8, 3, 8, 8), 100, dtype=torch.uint8)
    warm = clean.clone()
    warm[:, 0] += 80  # red up
    warm[:, 2] -= 60  # blue down: a sign flip would pick it
    assert compromised_neurons(toy_model(), clean, warm, "penultimate", 1).tolist() == [0]
    assert compromised_neurons(toy_model(), clean, warm, "penultimate", 2).tolist() == [0, 1]


def test_injector_raises_the_compromised_neuron_within_its_bound() -> None:
    torch.manual_seed(0)
    model = toy_model()
    before = [p.detach().clone() for p in model.parameters()]
    images = torch.randint(60, 190, (320, 3, 8, 8), dtype=torch.uint8)
    injector = FeatureInjector(3, width=4, bound=0.1)
    module = InjectorModule(injector, model, "penultimate", torch.tensor([2]), TensorBatches(
        images, torch.zeros(320, dtype=torch.long), 16), (8, 8))
    fit(module, TrainingRecipe(0, 16, 2, None, None, {**RECIPE, "max_epochs": 2}), 0)  # 40 steps
    with torch.no_grad():
        x = to_float(images)
        injected = injector(x)
    change = injected - x
    assert change[:, 2].mean() > 0.015 and change.abs().max() <= 0.1 + 1e-6  # blue raised, within the bound
    assert change[:, 2].mean() > 2 * change[:, 0].abs().mean()  # the others stay nearer where they were
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # the model is frozen
    assert all(p.requires_grad for p in model.parameters())


def test_detoxification_adds_true_labelled_detoxicants(trained) -> None:
    services = create([*TINY_DFST, "attack.detox_rounds=1", "attack.detox_images=24", "attack.detox_epochs=1",
                       f"cache_dir={trained['root']}"])
    _, module, train_set = services.trojan_training()
    batches = module.train_batches
    extra = len(batches.labels) - len(train_set)
    assert extra == 24 and not bool(batches.is_poison[len(train_set):].any())
    probe = services.attack._train_index_unpoisoned()
    clean = services.data.train
    assert torch.equal(batches.labels[len(train_set):], clean.labels[probe])
    detoxicants = batches.images[len(train_set):].float()
    change = (detoxicants - clean.images[probe].float()).abs()
    assert change.max() <= 0.1 * 255 + 1 and change.mean() > 0  # injected, within detox_bound


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, field", [({"style_images": 0}, "attack.style_images"),
                                           ({"generator_epochs": 0}, "attack.generator_epochs"),
                                           ({"detox_rounds": -1}, "attack.detox_rounds"),
                                           ({"detox_bound": 0.0}, "attack.detox_bound"),
                                           ({"style_root": ""}, "attack.style_root")])
def test_bad_settings_are_one_config_error(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        DFST(**kwargs)
    assert error.value.field == field and "\n" not in str(error.value)


def test_unusable_style_folders_are_refused(tmp_path: Path) -> None:
    empty, text, broken = tmp_path / "empty", tmp_path / "text", tmp_path / "broken"
    for folder in (empty, text, broken):
        folder.mkdir()
    (text / "notes.txt").write_text("no images here")
    (broken / "x.png").write_bytes(b"not a png")
    for folder, words in ((empty, "holds no image files"), (text, "holds no image files"), (broken, "cannot read"),
                          (tmp_path / "missing", "is not a directory")):
        with pytest.raises(ConfigError, match=words) as error:
            load_style_folder(folder, 3, (16, 16))
        assert error.value.field == "attack.style_root"


def test_empty_style_folder_on_the_command_line_is_exit_2_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "style").mkdir()
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["bdlab.run", *TINY_DFST, f"attack.style_root={tmp_path / 'style'}",
                                      f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}",
                                      "hydra/job_logging=none", "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as stop:
        cli()
    assert_refused(stop.value.code, capsys.readouterr().err, tmp_path / "run", tmp_path / "cache",
                   "attack.style_root", "holds no image files")


def test_unknown_detox_layer_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no layer 'nosuch'") as error:
        create([*TINY_DFST, "attack.detox_rounds=1", "attack.detox_layer=nosuch", f"cache_dir={tmp_path}"])
    assert error.value.field == "attack.detox_layer"
