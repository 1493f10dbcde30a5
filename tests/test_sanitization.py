"""Model sanitisation: the protocol's caching and deltas, unlearning with recovered triggers, hardening."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bdlab.compose import compose_config
from bdlab.defenses.model_sanitisation.hardening import distance_gain
from bdlab.errors import ConfigError
from bdlab.pipeline import execute, prepare
from bdlab.training.recipe import TrainingRecipe
from tests.conftest import TINY_RUN
from tests.test_transforms import shared_cache

# a trojaned tiny model that inspection can read: a 4x4 patch on 20% of the training set
PLANTED = [*TINY_RUN, "attack.patch_size=4", "attack.poison_rate=0.2", "dataset.defense_fraction=0.4"]
# on 16x16 gratings Neural Cleanse recovers a 10-pixel part of the patch, with AIV about 1.6, hence the threshold
SMALL_INSPECTOR = ["defense.inspector.epochs=60", "defense.inspector.optimisation_images=64",
                   "defense.inspector.evaluation_images=50", "defense.inspector.aiv_threshold=1.0",
                   "defense.epochs=20", "defense.lr=0.01"]


def test_unlearning_removes_the_planted_backdoor_and_is_cached(tmp_path: Path, tmp_path_factory) -> None:
    cache = shared_cache(tmp_path_factory)
    cfg = compose_config([*PLANTED, "defense=unlearning", *SMALL_INSPECTOR, f"cache_dir={cache}"])
    first = execute(prepare(cfg), tmp_path / "one", [])
    metrics = first["metrics"]
    assert metrics["trojan/asr"] > 80 and metrics["defense/unlearnt_classes"] >= 1
    assert metrics["defense/asr"] < 50 and metrics["defense/acc"] > 80
    assert metrics["defense/ard"] == pytest.approx(metrics["trojan/asr"] - metrics["defense/asr"])
    assert metrics["defense/cad"] == pytest.approx(metrics["trojan/acc"] - metrics["defense/acc"])
    assert len(list((cache / "models" / "sanitized" / "unlearning").glob("*/tensors.safetensors"))) == 1
    again = execute(prepare(cfg), tmp_path / "two", [])["metrics"]
    assert again == metrics  # the sanitised model and its running time come from the cache
    # the same fine-tuning with (almost) no stamped image keeps the backdoor: the recovered trigger removes it
    control = compose_config([*PLANTED, "defense=unlearning", *SMALL_INSPECTOR, "defense.share=0.01",
                              f"cache_dir={cache}"])
    assert execute(prepare(control), tmp_path / "three", [])["metrics"]["defense/asr"] > 80


def test_recipe_variant_keeps_the_optimizer_and_follows_the_new_epochs() -> None:
    recipe = TrainingRecipe.from_config(compose_config(TINY_RUN))
    variant = recipe.variant(3, 0.002)
    optimizer = variant.optimizer([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.002
    assert optimizer.defaults["momentum"] == 0.9 and variant.scheduler(optimizer).T_max == 3
    assert variant.max_epochs == variant.trainer["max_epochs"] == 3 and recipe.max_epochs == 5


def test_distance_gain_is_equation_12() -> None:
    before = torch.tensor([10.0, 20.0, math.nan, 5.0])
    after = torch.tensor([15.0, 10.0, 8.0, math.nan])  # pairs with an undefined distance are left out
    assert distance_gain(before, after) == pytest.approx(100 * (0.5 - 0.5) / 2)
    assert distance_gain(torch.tensor([4.0]), torch.tensor([6.0])) == pytest.approx(50.0)


def test_hardening_increases_the_class_distance_on_a_toy_problem(tmp_path: Path, tmp_path_factory) -> None:
    # distance_images 17: the held-out split's largest class (120 images), all of every source class
    cfg = compose_config([*TINY_RUN, "attack=none", "defense=hardening", "defense.generator=nc", "defense.data=train",
                          "defense.epochs=2", "dataset.defense_fraction=0.4", "defense.pairs=6",
                          "defense.distance_epochs=15", "defense.distance_images=17",
                          f"cache_dir={shared_cache(tmp_path_factory)}"])
    metrics = execute(prepare(cfg), tmp_path / "run", [])["metrics"]
    assert metrics["defense/class_distance_nc_after"] > metrics["defense/class_distance_nc_before"]
    assert metrics["defense/class_distance_gain_nc"] > 10


@pytest.mark.parametrize("overrides, field", [
    (["defense=unlearning", "defense.inspector._target_=bdlab.defenses.input_filtering.strip.STRIP"], "defense.inspector"),
    (["defense=unlearning", "defense.share=0"], "defense.share"),
    (["defense=unlearning", "defense.inspector.epochs=0"], "defense.inspector.epochs"),
    (["defense=hardening", "defense.pair_list=[[0,12]]"], "defense.pair_list"),
    (["defense=hardening", "defense.pair_list=[[3,3]]"], "defense.pair_list"),
    (["defense=hardening", "defense.generator=gan"], "defense.generator"),
    (["defense=hardening", "defense.inner_steps=0"], "defense.inner_steps"),
    (["defense=hardening", "defense.pairs=100000"], "defense.pairs"),  # 10 classes: at most 90 pairs
    (["defense=hardening", "defense.pairs=91", "defense.distance_images=5"], "defense.pairs"),
    (["defense=hardening", "defense.distance_images=0"], "defense.distance_images"),
    (["defense=hardening", "defense.distance_images=100000"], "defense.distance_images"),
])
def test_bad_sanitisation_values_are_refused_before_training(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, *overrides]))
    assert info.value.field == field and "\n" not in str(info.value)
