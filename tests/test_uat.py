"""UAT ("Why is your Trojan NOT responding?" Eq. 3): the patch optimisation, the attack end to end, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from bdlab.attacks.uat import UAT, PatchPattern
from bdlab.compose import compose_config
from bdlab.errors import ConfigError
from bdlab.inversion.engine import InversionEngine
from bdlab.models.classifier import Classifier
from bdlab.pipeline import execute, prepare
from tests.conftest import TINY_RUN, StubResources, make_splits
from tests.test_transforms import shared_cache


class CornerModel(nn.Module):
    """Class 1's logit rises with the bottom-right 4x4 corner's brightness, class 0's with the rest's."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        corner = x[:, 0, 12:, 12:].mean((1, 2))
        rest = x[:, 0].mean((1, 2))
        return torch.stack([10 * rest, 10 * corner - 3], 1) + self.anchor


def corner_mask() -> Tensor:
    mask = torch.zeros(1, 16, 16)
    mask[:, 12:, 12:] = 1
    return mask


def test_the_patch_optimisation_lowers_the_target_loss_from_its_random_start() -> None:
    model = Classifier(CornerModel(), (0.0,), (1.0,))
    x = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    y = torch.zeros(64, dtype=torch.long)
    method = PatchPattern(corner_mask(), lr=0.1)
    start = method.trigger(method.variables([1], (1, 16, 16), seed=0), [0])
    result = InversionEngine(method, epochs=30, batch_size=32, threshold=1.0).run(model, x, y, [1])

    def target_loss(pattern: Tensor) -> float:
        stamped = x + corner_mask() * (pattern - x)
        return float(F.cross_entropy(model(stamped), torch.ones(64, dtype=torch.long)))

    learned = result.trigger.pattern[0]
    assert target_loss(learned) < target_loss(start.pattern[0]) - 0.5
    assert result.success[0] == 1.0 and learned[:, 12:, 12:].mean() > 0.9  # brightened where class 1 looks
    assert torch.equal(result.trigger.mask[0], corner_mask())


def test_the_learned_patch_stays_inside_its_box_and_round_trips_through_the_state(tmp_path: Path) -> None:
    images = (torch.rand(200, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 120).to(torch.uint8)
    data = make_splits(images, torch.arange(200) % 2, 2)
    model = Classifier(CornerModel(), (0.0,), (1.0,))
    attack = UAT(patch_size=4, margin=0, trigger_epochs=40, trigger_lr=0.3, optimisation_images=50, target_class=1)
    attack.setup(data, StubResources(tmp_path, {0: model}))
    attack.learn_trigger(data.train, "cpu")
    outside = attack.mask[0] == 0
    assert (attack.pattern[:, outside] == 0).all() and attack.pattern[:, 12:, 12:].mean() > 0.9
    other = UAT(patch_size=4, margin=0, target_class=1)
    other.setup(data, StubResources(tmp_path, {0: model}))
    other.load_state_dict(attack.state_dict())
    assert torch.equal(other.stamp(data.test.images), attack.stamp(data.test.images))


def test_uat_end_to_end_and_a_cache_hit_restores_the_patch(tmp_path: Path, tmp_path_factory) -> None:
    overrides = [*TINY_RUN, "attack=uat", "attack.trigger_epochs=5", "attack.optimisation_images=300",
                 f"cache_dir={shared_cache(tmp_path_factory)}"]
    first = execute(prepare(compose_config(overrides)), tmp_path / "one", [])
    again = execute(prepare(compose_config(overrides)), tmp_path / "two", [])
    metrics = first["metrics"]
    assert metrics["trojan/acc"] > 85 and metrics["trojan/asr"] > 90 and metrics["trojan/asr"] > metrics["clean/asr"]
    assert again["artifacts"]["trojan_model"]["reused"]
    assert torch.equal(first["poisoned_test"].images, again["poisoned_test"].images)
    assert metrics["attack/psnr"] < 30 and metrics["attack/linf"] > 0


@pytest.mark.parametrize("overrides, field", [
    (["attack.patch_size=17"], "attack.patch_size"),
    (["attack.patch_size=14"], "attack.position"),  # 14 + margin 3 runs off a 16-pixel image
    (["attack.trigger_epochs=0"], "attack.trigger_epochs"),
    (["attack.trigger_lr=0"], "attack.trigger_lr"),
    (["attack.optimisation_images=0"], "attack.optimisation_images"),
])
def test_bad_uat_values_are_refused_before_training(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, "attack=uat", *overrides]))
    assert info.value.field == field and "\n" not in str(info.value)
