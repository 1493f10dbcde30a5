"""Label-consistent attack: four-corner symmetric trigger, PGD on the surrogate, clean labels, cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bdlab.attacks.label_consistent import LabelConsistent
from bdlab.cache import ArtifactCache
from bdlab.compose import compose_config
from bdlab.errors import ConfigError
from bdlab.models import LeNet
from bdlab.models.classifier import build_classifier
from bdlab.pipeline import execute, prepare
from tests.conftest import TINY_RUN, make_splits
from tests.test_transforms import shared_cache


def handmade(n: int = 80) -> tuple:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 16, 16), generator=generator, dtype=torch.uint8)
    labels = torch.arange(n) % 4
    return make_splits(images, labels, num_classes=4)


def surrogate():
    torch.manual_seed(0)
    return build_classifier(LeNet, (1, 16, 16), 4, (0.5,), (0.25,))


def test_trigger_is_four_symmetric_corners_blended_at_test_amplitude() -> None:
    attack = LabelConsistent(test_amplitude=0.5)
    attack.setup(handmade())
    x = torch.rand(3, 1, 16, 16)
    stamped = attack.apply(x)
    mask = attack.trigger_mask
    assert mask.sum() == 4 * 9 and mask[0, 0] and mask[15, 15] and mask[0, 15] and mask[15, 0] and not mask[8, 8]
    assert torch.equal(stamped[:, :, ~mask], x[:, :, ~mask])
    assert torch.allclose(stamped[:, :, 0, 0], 0.5 * x[:, :, 0, 0] + 0.5)
    assert torch.allclose(attack.apply(x.flip(-1)), stamped.flip(-1))  # symmetric: Flip leaves it in place
    assert torch.allclose(attack.apply(x.flip(-2)), stamped.flip(-2))


def test_poisons_only_the_target_class_with_bounded_perturbation_and_caches(tmp_path: Path) -> None:
    data = handmade()
    attack = LabelConsistent(poison_rate=0.25, epsilon=8 / 255, step=2 / 255, iterations=5, target_class=1)
    attack.setup(data)
    with pytest.raises(RuntimeError):
        attack.poison_train(data.train)
    cache = ArtifactCache(tmp_path)
    attack.use_clean_model(surrogate(), cache, "key")
    poisoned = attack.poison_train(data.train)
    assert torch.equal(poisoned.labels, data.train.labels)  # clean-label
    assert poisoned.is_poison.sum() == 5 and (data.train.labels[poisoned.is_poison] == 1).all()
    changed = (poisoned.images != data.train.images).flatten(1).any(1)
    assert torch.equal(changed, poisoned.is_poison)
    difference = (poisoned.images.float() - data.train.images.float()).abs()[poisoned.is_poison]
    off_trigger = difference[:, :, ~attack.trigger_mask]
    assert off_trigger.max() <= 8 + 1 and off_trigger.max() > 0  # PGD within epsilon (plus rounding)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1
    again = attack.poison_train(data.train)
    assert torch.equal(again.images, poisoned.images)


def test_zero_iterations_is_the_trigger_alone(tmp_path: Path) -> None:
    data = handmade()
    attack = LabelConsistent(iterations=0, amplitude=0.25)
    attack.setup(data)
    attack.use_clean_model(surrogate(), ArtifactCache(tmp_path), "key")
    poisoned = attack.poison_train(data.train)
    index = poisoned.is_poison
    x, m = data.train.images[index].float() / 255, 0.25 * attack.trigger_mask.float()
    expected = (x * (1 - m) + m * attack.pattern) * 255
    assert (poisoned.images[index].float() - expected).abs().max() <= 0.5001


def test_end_to_end_on_the_tiny_run(tmp_path: Path, tmp_path_factory) -> None:
    cache = shared_cache(tmp_path_factory)  # the clean model is the one the other tiny runs train
    cfg = compose_config([*TINY_RUN, "attack=label_consistent", "attack.poison_rate=0.5", f"cache_dir={cache}"])
    metrics = execute(prepare(cfg), cfg.cache_dir, tmp_path / "run", [])["metrics"]
    assert metrics["trojan/acc"] > 80 and metrics["trojan/asr"] >= 0
    assert list((cache / "poisoned" / "label_consistent").glob("*/tensors.safetensors"))


@pytest.mark.parametrize("overrides, field", [
    (["attack.amplitude=0"], "attack.amplitude"), (["attack.amplitude=1.5"], "attack.amplitude"),
    (["attack.test_amplitude=2"], "attack.test_amplitude"), (["attack.epsilon=-0.1"], "attack.epsilon"),
    (["attack.step=2"], "attack.step"), (["attack.iterations=-1"], "attack.iterations"),
    (["attack.poison_rate=0"], "attack.poison_rate"),
])
def test_bad_values_are_refused_before_training(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, "attack=label_consistent", *overrides]))
    assert str(info.value).startswith(field)
