"""Trigger stamping to the exact pixel, poison-index determinism, poisoned sets, bad values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bdlab.attacks import BadNets, Blended, BlendedPatch
from bdlab.compose import CONFIG_DIR
from bdlab.errors import ConfigError
from tests.conftest import make_splits


def splits(n: int = 100, channels: int = 1, size: int = 8, classes: int = 10):
    labels = torch.arange(n) % classes
    return make_splits(torch.zeros(n, channels, size, size, dtype=torch.uint8), labels, classes)


def test_badnets_default_3x3_white_bottom_right() -> None:
    attack = BadNets()
    attack.setup(splits())
    out = attack.apply(torch.zeros(2, 1, 8, 8))
    expected = torch.zeros(2, 1, 8, 8)
    expected[:, :, 5:, 5:] = 1.0
    assert torch.equal(out, expected)
    assert attack.trigger_mask.sum() == 9 and attack.trigger_mask[7, 7] and not attack.trigger_mask[4, 4]


def test_badnets_position_margin_colour() -> None:
    attack = BadNets(patch_size=[2, 3], position="top_left", margin=1, color=[255, 0, 128])
    attack.setup(splits(channels=3))
    out = attack.apply(torch.full((1, 3, 8, 8), 0.5))
    assert torch.equal(out[0, :, 1:3, 1:4], torch.tensor([1.0, 0.0, 128 / 255]).view(3, 1, 1).expand(3, 2, 3))
    untouched = torch.ones(8, 8, dtype=torch.bool)
    untouched[1:3, 1:4] = False
    assert (out[0][:, untouched] == 0.5).all()
    explicit = BadNets(patch_size=1, position=[0, 7])
    explicit.setup(splits())
    assert explicit.apply(torch.zeros(1, 1, 8, 8))[0, 0].nonzero().tolist() == [[0, 7]]


def test_badnets_pattern_file(tmp_path: Path) -> None:
    pattern = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    Image.fromarray(pattern).save(tmp_path / "p.png")
    attack = BadNets(pattern_file=str(tmp_path / "p.png"))
    attack.setup(splits())
    out = attack.apply(torch.full((1, 1, 8, 8), 0.5))
    assert out[0, 0, 6:, 6:].tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_pattern_file_falls_back_to_the_conf_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the shipped pattern is not reachable from here by its relative path
    attack = BadNets(pattern_file="experiment/checkerboard3.png")
    attack.setup(splits())
    assert (CONFIG_DIR / "experiment/checkerboard3.png").is_file()
    out = attack.apply(torch.full((1, 1, 8, 8), 0.5))
    assert out[0, 0, 5:, 5:].tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]


def test_blended_patch_mixes_the_patch_in_its_box_only() -> None:
    attack = BlendedPatch(pattern_file="experiment/checkerboard3.png")
    assert attack.alpha == 0.2 and attack.poison_rate == 0.2 and attack.name == "blended_patch"
    attack.setup(splits())
    out = attack.apply(torch.full((1, 1, 8, 8), 0.5))
    checker = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    assert torch.allclose(out[0, 0, 5:, 5:], 0.8 * 0.5 + 0.2 * checker)
    outside = torch.ones(8, 8, dtype=torch.bool)
    outside[5:, 5:] = False
    assert (out[0, 0][outside] == 0.5).all()
    assert attack.trigger_mask.sum() == 9  # the analyses still see the patch's box


def test_stamp_rounds_to_uint8_levels() -> None:
    attack = Blended(alpha=0.2)
    attack.setup(splits())
    images = torch.full((3, 1, 8, 8), 100, dtype=torch.uint8)
    stamped = attack.stamp(images)
    expected = (0.8 * 100 / 255 + 0.2 * attack.pattern) * 255
    assert stamped.dtype == torch.uint8
    assert (stamped.float() - expected.round()).abs().max() <= 1


def test_blended_formula_and_seeded_noise() -> None:
    a, b, c = Blended(alpha=0.2, seed=1), Blended(alpha=0.2, seed=1), Blended(alpha=0.2, seed=2)
    for attack in (a, b, c):
        attack.setup(splits(channels=3))
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(a.apply(x), 0.8 * x + 0.2 * a.pattern, atol=1e-6)
    assert torch.equal(a.pattern, b.pattern) and not torch.equal(a.pattern, c.pattern)
    assert a.trigger_mask.all()


def test_blended_pattern_file_resized(tmp_path: Path) -> None:
    Image.fromarray(np.full((20, 30, 3), 255, dtype=np.uint8)).save(tmp_path / "white.png")
    attack = Blended(alpha=1.0, pattern_file=str(tmp_path / "white.png"))
    attack.setup(splits(channels=3))
    assert attack.pattern.shape == (3, 8, 8) and torch.allclose(attack.pattern, torch.ones(3, 8, 8))


def test_poison_indices_are_seeded_non_target_and_counted() -> None:
    labels = torch.arange(1000) % 10
    first = BadNets(poison_rate=0.1, target_class=3, seed=7).poison_indices(labels)
    again = BadNets(poison_rate=0.1, target_class=3, seed=7).poison_indices(labels)
    other = BadNets(poison_rate=0.1, target_class=3, seed=8).poison_indices(labels)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len(first) == 100 and len(set(first.tolist())) == 100
    assert (labels[first] != 3).all()


def test_poison_train_and_test_sets() -> None:
    data = splits(n=200)
    attack = BadNets(poison_rate=0.25, target_class=2)
    attack.setup(data)
    poisoned = attack.poison_train(data.train)
    index = attack.poison_indices(data.train.labels)
    assert poisoned.is_poison.sum() == 50 and poisoned.is_poison[index].all()
    assert (poisoned.labels[index] == 2).all()
    assert torch.equal(poisoned.labels[~poisoned.is_poison], data.train.labels[~poisoned.is_poison])
    assert (poisoned.images[index][:, 0, 5:, 5:] == 255).all()
    assert (poisoned.images[~poisoned.is_poison] == 0).all()
    test = attack.poison_test(data.test)
    assert len(test) == 180 and (test.labels != 2).all() and (test.images[:, 0, 7, 7] == 255).all()


@pytest.mark.parametrize("make, field", [
    (lambda: BadNets(poison_rate=0.0), "attack.poison_rate"),
    (lambda: BadNets(poison_rate=1.5), "attack.poison_rate"),
    (lambda: Blended(alpha=1.5), "attack.alpha"),
    (lambda: Blended(alpha=-0.1), "attack.alpha"),
    (lambda: BadNets(alpha=0.0), "attack.alpha"),
    (lambda: BlendedPatch(alpha=1.2), "attack.alpha"),
])
def test_invalid_values_fail_at_construction(make, field) -> None:
    with pytest.raises(ConfigError, match=field):
        make()


@pytest.mark.parametrize("attack, field", [
    (BadNets(target_class=10), "attack.target_class"),
    (BadNets(target_class=-1), "attack.target_class"),
    (BadNets(patch_size=9), "attack.patch_size"),
    (BadNets(patch_size=3, position=[6, 6]), "attack.position"),
    (BadNets(patch_size=3, margin=6), "attack.position"),
    (BadNets(position="middle"), "attack.position"),
    (BadNets(color=300), "attack.color"),
    (BadNets(pattern_file="/no/such/file.png"), "attack.pattern_file"),
    (BadNets(pattern_file="no/such/relative.png"), "attack.pattern_file"),
    (Blended(pattern_file="/no/such/file.png"), "attack.pattern_file"),
    (BadNets(poison_rate=0.95), "attack.poison_rate"),
])
def test_invalid_values_fail_at_setup(attack, field) -> None:
    with pytest.raises(ConfigError, match=field) as info:
        attack.setup(splits())
    assert "\n" not in str(info.value)
