"""Fine-pruning: the dormant-first order, the accuracy bound, masks that survive fine-tuning, end to end."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bdlab.compose import compose_config
from bdlab.datasets.base import ImageSet
from bdlab.defenses.model_sanitisation.fine_pruning import FinePruning, channel_activity, last_convolution
from bdlab.errors import ConfigError
from bdlab.models.classifier import Classifier
from bdlab.pipeline import execute, prepare
from bdlab.training.recipe import TrainingRecipe
from tests.conftest import TINY_RUN
from tests.test_sanitization import PLANTED
from tests.test_transforms import shared_cache


class Planted(nn.Module):
    """A planted backdoor: conv channel 0 copies the image (class 1 = bright), channel 1 is a constant
    the head ignores, channel 2 fires only on a white pixel (the trigger; dormant on clean images)
    and drives class 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 0.0, 5.0]).view(3, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 0.9, -4.5]))
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-10.0, 0.0, 0.0], [10.0, 0.0, 400.0]]))
            self.head.bias.copy_(torch.tensor([5.0, -5.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def bright_or_dark(n: int = 40) -> ImageSet:
    labels = torch.arange(n) % 2
    images = (labels.view(-1, 1, 1, 1) * 180 + 20).expand(n, 1, 4, 4).to(torch.uint8).clone()
    return ImageSet(images, labels)


def attack_success(model: Classifier) -> float:
    dark = bright_or_dark().images[::2].clone()
    dark[:, :, 0, 0] = 255  # the trigger on class-0 images
    with torch.no_grad():
        return float((model(dark.float() / 255).argmax(1) == 1).float().mean())


def test_channels_are_pruned_dormant_first_and_stop_before_the_accuracy_bound() -> None:
    model = Classifier(Planted(), (0.0,), (1.0,))
    data = bright_or_dark()
    assert attack_success(model) == 1.0
    activity = channel_activity(model, data.images, "conv")
    assert activity.argsort().tolist() == [2, 0, 1]  # the dormant trigger channel, the task's, the constant
    conv, pruned, accuracy = FinePruning(max_prune_ratio=99).prune(model, data)
    assert pruned == 1 and accuracy == 100.0  # channel 0 comes next and carries the task: 50 points, so stop
    assert conv.weight[2].item() == 0 and conv.bias[2].item() == 0
    assert conv.weight[0].item() == 1.0 and conv.bias[1].item() == pytest.approx(0.9)
    assert attack_success(model) == 0.0 and last_convolution(model) == "conv"


def test_pruned_channels_stay_pruned_through_fine_tuning_and_the_keys_stay(tmp_path: Path) -> None:
    model = Classifier(Planted(), (0.0,), (1.0,))
    keys = set(model.state_dict())
    data = bright_or_dark()
    context = SimpleNamespace(data=SimpleNamespace(defense=data, crop_padding=0, hflip=False), device="cpu",
                              recipe=TrainingRecipe.from_config(compose_config(TINY_RUN)))
    reports = FinePruning(max_prune_ratio=99, epochs=3, lr=0.5).sanitize(model, context)
    assert reports == {"pruned_channels": 1, "pruned_share": pytest.approx(100 / 3), "acc_pruned": 100.0}
    assert set(model.state_dict()) == keys and model.net.conv.weight[2].item() == 0 and model.net.conv.bias[2].item() == 0
    assert model.net.conv.weight[0].item() != 1.0  # fine-tuning did train the rest
    assert attack_success(model) == 0.0


def test_fine_pruning_runs_end_to_end_and_nothing_pruned_changes_nothing(tmp_path: Path, tmp_path_factory) -> None:
    # LeNet's 16-channel conv2 on gratings has no dormant backdoor channel (MNIST figures in docs/inspection.md):
    # pruning within 4 points removes a quarter of the channels and the backdoor stays
    cfg = compose_config([*PLANTED, "defense=fine_pruning", "defense.epochs=2",
                          f"cache_dir={shared_cache(tmp_path_factory)}"])
    metrics = execute(prepare(cfg), tmp_path / "run", [])["metrics"]
    assert 0 < metrics["defense/pruned_share"] < 95 and metrics["defense/acc_pruned"] >= 96 - 4
    control = compose_config([*PLANTED, "defense=fine_pruning", "defense.epochs=0", "defense.max_prune_ratio=1",
                              f"cache_dir={shared_cache(tmp_path_factory)}"])
    same = execute(prepare(control), tmp_path / "control", [])["metrics"]
    assert same["defense/pruned_channels"] == 0 and same["defense/asr"] == same["trojan/asr"]


@pytest.mark.parametrize("overrides, field", [
    (["defense.max_acc_drop=0"], "defense.max_acc_drop"),
    (["defense.max_acc_drop=100"], "defense.max_acc_drop"),
    (["defense.max_prune_ratio=120"], "defense.max_prune_ratio"),
    (["defense.layer=conv9"], "defense.layer"),
    (["defense.layer=fc1"], "defense.layer"),
])
def test_bad_fine_pruning_values_are_refused_before_training(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, "defense=fine_pruning", *overrides]))
    assert info.value.field == field and "\n" not in str(info.value)
