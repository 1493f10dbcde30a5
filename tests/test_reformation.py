"""Input-reformation defenses and the enhanced (+) attacks: protocol, end to end, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bdlab.attacks.badnets import BadNets
from bdlab.compose import compose_config
from bdlab.errors import ConfigError
from bdlab.pipeline import execute, prepare
from bdlab.run import run_names
from tests.conftest import TINY_RUN, make_splits
from tests.test_transforms import shared_cache

DEFENSES = ["flip", "shrinkpad", "gaussian_noise", "color_jitter", "randomized_smoothing", "down_upsample"]
KEYS = {"defense/acc", "defense/ccc", "defense/asr", "defense/tmc", "defense/acc_before", "defense/ccc_before",
        "defense/asr_before", "defense/ard", "defense/cad", "defense/time_per_input_ms"}


def test_every_reformation_defense_end_to_end_in_process(tmp_path: Path, tmp_path_factory) -> None:
    """One trained pair of models (cached), every defense on it: keys, protocol arithmetic, effect."""
    results = {}
    for name in DEFENSES:
        cfg = compose_config([*TINY_RUN, "attack.patch_size=4", "attack.poison_rate=0.2", f"defense={name}",
                              f"cache_dir={shared_cache(tmp_path_factory)}"])
        results[name] = execute(prepare(cfg), tmp_path / name, [])["metrics"]
    for name, metrics in results.items():
        assert set(metrics) >= KEYS, name
        assert metrics["defense/ard"] == pytest.approx(metrics["trojan/asr"] - metrics["defense/asr"])
        assert metrics["defense/cad"] == pytest.approx(metrics["trojan/acc"] - metrics["defense/acc"])
        assert metrics["defense/asr_before"] == metrics["trojan/asr"] and metrics["defense/time_per_input_ms"] > 0
    assert results["flip"]["trojan/asr"] > 80
    # the bottom-right patch moves to the bottom-left under Flip: the backdoor stops responding
    assert results["flip"]["defense/ard"] > 50


def test_enhanced_attack_is_named_with_a_plus() -> None:
    cfg = compose_config([*TINY_RUN, "attack.enhance=true", "defense=shrinkpad"])
    assert run_names(cfg, prepare(cfg))["attack"] == "badnets+"


def test_enhancement_transforms_benign_and_poisoned_training_images_alike() -> None:
    attack = BadNets(enhance=True, enhance_max_shrink=4, patch_size=3)
    assert attack.display_name == "badnets+" and BadNets().display_name == "badnets"
    images = torch.full((64, 1, 16, 16), 200, dtype=torch.uint8)
    labels = torch.arange(64) % 4
    data = make_splits(images, labels, num_classes=4)
    attack.setup(data)
    poisoned = attack.poison_train(data.train)
    x = poisoned.images.float() / 255
    torch.manual_seed(0)
    out = attack.train_transform(x)
    changed = (out != x).flatten(1).any(1)
    # most of both groups change (a sample is left alone only when it draws no flip and shrink 0)
    for group in (poisoned.is_poison, ~poisoned.is_poison):
        assert changed[group].float().mean() > 0.6
    assert torch.equal(BadNets().train_transform(x), x)


@pytest.mark.parametrize("overrides, field", [
    (["defense=shrinkpad", "defense.size=16"], "defense.size"),
    (["defense=shrinkpad", "defense.size=-1"], "defense.size"),
    (["defense=gaussian_noise", "defense.std=-0.1"], "defense.std"),
    (["defense=randomized_smoothing", "defense.std=-1"], "defense.std"),
    (["defense=randomized_smoothing", "defense.samples=0"], "defense.samples"),
    (["defense=color_jitter", "defense.magnitude=1.5"], "defense.magnitude"),
    (["defense=color_jitter", "defense.kind=hue", "defense.magnitude=0.6"], "defense.magnitude"),
    (["defense=color_jitter", "defense.kind=blur"], "defense.kind"),
    (["defense=down_upsample", "defense.ratio=0"], "defense.ratio"),
    (["defense=down_upsample", "defense.ratio=0.01"], "defense.ratio"),
    (["attack.enhance=true", "attack.enhance_max_shrink=16"], "attack.enhance_max_shrink"),
    (["attack.enhance_max_shrink=-2"], "attack.enhance_max_shrink"),
])
def test_bad_values_are_refused_before_training(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, *overrides]))
    assert str(info.value).startswith(field)


@pytest.mark.parametrize("option", DEFENSES)
def test_every_reformation_changes_its_input_the_way_its_transform_says(option: str) -> None:
    """A defense whose transform returned its input (or another transform's output) fails here."""
    from hydra.utils import instantiate

    from bdlab.transforms import color_jitter, down_upsample, gaussian_noise, make_generator, random_flip, shrink_pad

    defense = instantiate(compose_config([f"defense={option}"]).defense)
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    defense.generator = make_generator(5, "cpu")
    out = defense.transform(x)
    reference = {
        "flip": lambda: random_flip(x, p=1.0),
        "shrinkpad": lambda: shrink_pad(x, 4, make_generator(5, "cpu")),
        "gaussian_noise": lambda: gaussian_noise(x, 10 / 255, make_generator(5, "cpu")),
        "color_jitter": lambda: color_jitter(x, "brightness", 0.2, make_generator(5, "cpu")),
        "randomized_smoothing": lambda: gaussian_noise(x, 0.25, make_generator(5, "cpu")),
        "down_upsample": lambda: down_upsample(x, 0.5),
    }[option]()
    assert torch.equal(out, reference)
    assert (out - x).abs().mean() > 0.01  # not the identity
