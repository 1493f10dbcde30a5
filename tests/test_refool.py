"""Refool: each reflection type on hand-built images, the pool, caching, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bdlab.attacks.refool import Refool, blend_reflections, reflection_kernels
from bdlab.errors import ConfigError
from tests.conftest import StubResources, make_splits


def one_kernel(kind: int, sigma: float = 1.0, offset: tuple[int, int] = (0, 0), ghost_alpha: float = 0.0,
               size: int = 9) -> torch.Tensor:
    return reflection_kernels(torch.tensor([kind]), torch.tensor([sigma]), torch.tensor([offset]),
                              torch.tensor([ghost_alpha]), size)


def dot_image(size: int = 16, row: int = 8, col: int = 8) -> torch.Tensor:
    image = torch.zeros(1, 1, size, size)
    image[0, 0, row, col] = 1.0
    return image


def test_same_depth_adds_the_reflection_itself() -> None:
    x, reflection = torch.full((1, 1, 16, 16), 0.25), dot_image()
    out = blend_reflections(x, reflection, one_kernel(0), torch.tensor([0.4]), gamma=1.0)
    expected = 0.6 * x + 0.4 * reflection
    assert torch.allclose(out, expected, atol=1e-6)


def test_out_of_focus_spreads_the_reflection_as_a_gaussian() -> None:
    x, reflection = torch.zeros(1, 1, 16, 16), dot_image()
    out = blend_reflections(x, reflection, one_kernel(1, sigma=1.5), torch.tensor([1.0]), gamma=1.0)[0, 0]
    assert out.sum().item() == pytest.approx(1.0, abs=1e-5)  # the kernel keeps the reflection's energy
    assert out[8, 8] == out.max() and out[8, 8] < 0.2  # peak stays centred but is blurred out
    assert out[8, 9] == pytest.approx(out[9, 8].item()) and out[8, 9] > out[8, 11] > 0  # isotropic, decaying


def test_ghost_makes_a_shifted_attenuated_double() -> None:
    x, reflection = torch.zeros(1, 1, 16, 16), dot_image()
    out = blend_reflections(x, reflection, one_kernel(2, offset=(2, 3), ghost_alpha=0.3), torch.tensor([1.0]),
                            gamma=1.0)[0, 0]
    nonzero = out.nonzero().tolist()
    assert len(nonzero) == 2
    assert out[8, 8] == pytest.approx(0.7) and out[6, 5] == pytest.approx(0.3)  # the double, shifted by (2, 3)


def test_blending_on_rgb_keeps_range_and_gamma_brightens_dark_regions() -> None:
    x = torch.rand(4, 3, 12, 12)
    reflections = torch.rand(4, 3, 12, 12)
    kernels = reflection_kernels(torch.tensor([0, 1, 2, 1]), torch.full((4,), 1.0), torch.full((4, 2), 2),
                                 torch.full((4,), 0.3), 7)
    out = blend_reflections(x, reflections, kernels, torch.full((4,), 0.3))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    dark = blend_reflections(torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8), one_kernel(0, size=3),
                             torch.tensor([0.2]))
    assert dark.mean().item() == pytest.approx(0.2 ** (1 / 2.2), abs=1e-5)


def small_splits(channels: int = 1) -> tuple:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, channels, 16, 16), dtype=torch.uint8, generator=generator)
    labels = torch.arange(200) % 10
    return make_splits(images, labels)


@pytest.mark.parametrize("channels", [1, 3])
def test_poisoning_is_seeded_dirty_label_and_cached(tmp_path: Path, channels: int) -> None:
    data = small_splits(channels)
    attack = Refool(poison_rate=0.1, sigma=[1.0, 2.0], ghost_offset=[1, 3], pool_size=20)
    attack.setup(data, StubResources(tmp_path / "cache"))
    poisoned = attack.poison_train(data.train)
    index = attack.poison_indices(data.train.labels)
    assert poisoned.is_poison.sum() == 20 and (poisoned.labels[index] == 0).all()
    assert not torch.equal(poisoned.images[index], data.train.images[index])
    assert torch.equal(poisoned.images[~poisoned.is_poison], data.train.images[~poisoned.is_poison])
    assert any((tmp_path / "cache" / "poisoned" / "refool").iterdir())
    again = Refool(poison_rate=0.1, sigma=[1.0, 2.0], ghost_offset=[1, 3], pool_size=20)
    again.setup(data)
    assert torch.equal(again.poison_train(data.train).images, poisoned.images)  # same seed, same images
    # the default pool avoids the target class and the poisoned samples
    assert len(attack.pool) == 20


def test_clean_label_poisons_the_target_class_and_keeps_labels() -> None:
    data = small_splits()
    attack = Refool(poison_rate=0.5, clean_label=True, sigma=[1.0, 2.0], ghost_offset=[1, 3], pool_size=10)
    attack.setup(data)
    poisoned = attack.poison_train(data.train)
    assert (data.train.labels[poisoned.is_poison] == 0).all() and poisoned.is_poison.sum() == 10
    assert torch.equal(poisoned.labels, data.train.labels)
    assert attack.display_name == "refool_clean_label"


def test_reflection_folder_is_loaded_and_resized(tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(np.full((20, 24, 3), 40 * i, dtype=np.uint8)).save(tmp_path / f"r{i}.png")
    attack = Refool(reflection_dir=str(tmp_path), sigma=[1.0, 2.0], ghost_offset=[1, 3])
    attack.setup(small_splits(3))
    assert attack.pool.shape == (3, 3, 16, 16)


@pytest.mark.parametrize("make, fragment", [
    (lambda d: d / "missing", "not a directory"),
    (lambda d: d, "no image files"),
    (lambda d: (d / "bad.png").write_bytes(b"not an image") and d, "cannot read"),
    (lambda d: Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(d / "tiny.png") or d, "smaller than"),
])
def test_unusable_reflection_folder_is_a_config_error(tmp_path: Path, make, fragment: str) -> None:
    folder = make(tmp_path)
    attack = Refool(reflection_dir=str(folder), sigma=[1.0, 2.0], ghost_offset=[1, 3])
    with pytest.raises(ConfigError) as error:
        attack.setup(small_splits())
    assert error.value.field == "attack.reflection_dir" and fragment in str(error.value)


@pytest.mark.parametrize("kwargs, field", [
    ({"reflection_type": "mirror"}, "attack.reflection_type"),
    ({"strength": [0.5, 0.1]}, "attack.strength"),
    ({"ghost_rate": 1.5}, "attack.ghost_rate"),
    ({"pool_size": 0}, "attack.pool_size"),
])
def test_bad_parameters_are_config_errors(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        Refool(**kwargs)
    assert error.value.field == field


def test_enhanced_refool_is_named_with_a_plus() -> None:
    from bdlab.attacks.refool import Refool

    assert Refool(enhance=True).display_name == "refool+"
    assert Refool(enhance=True, clean_label=True).display_name == "refool_clean_label+"
