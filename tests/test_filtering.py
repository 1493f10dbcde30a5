"""The input-filtering protocol: threshold at the FPR, ROC-AUC, rejection metrics, histogram."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from bdlab.attacks.badnets import BadNets
from bdlab.defenses.input_filtering.base import HISTOGRAM_FILE, InputFilteringDefense, roc_auc, threshold_at_fpr
from bdlab.errors import ConfigError
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices
from tests.conftest import make_services, make_splits


@pytest.mark.parametrize("count, fpr", [(500, 0.05), (400, 0.05), (123, 0.1), (1000, 0.01)])
def test_threshold_gives_the_requested_fpr_on_held_out_scores(count: int, fpr: float) -> None:
    scores = torch.randn(count, generator=torch.Generator().manual_seed(count))
    threshold = threshold_at_fpr(scores, fpr)
    flagged = (scores > threshold).sum().item()
    assert flagged == int(fpr * count)  # exactly floor(fpr * n) of distinct scores lie above


def test_roc_auc_on_hand_built_scores() -> None:
    assert roc_auc(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([3.0, 4.0])) == pytest.approx(1.0)
    assert roc_auc(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0, 2.0])) == pytest.approx(0.0)
    # one of the four (clean, poisoned) pairs is ordered wrongly
    assert roc_auc(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 3.0])) == pytest.approx(0.75)


class BrightnessFilter(InputFilteringDefense):
    """Scores an input by its bottom-right pixel, the BadNets patch."""

    name = "brightness"

    def scores(self, context: RunServices, images: Tensor) -> Tensor:
        return images[:, 0, -1, -1].float() + 0.1 * images.float().mean((1, 2, 3))


class PatchModel(nn.Module):
    """Class 0 when the bottom-right pixel is white, else class 1."""

    def forward(self, x: Tensor) -> Tensor:
        white = (x[:, 0, -1, -1] > 0.9).float()
        return torch.stack([white, 1 - white], 1) * 10


def test_protocol_reports_every_metric_and_writes_the_histogram(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 200, (400, 1, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.ones(400, dtype=torch.long)
    labels[:40] = 0
    data = make_splits(images, labels, num_classes=2)
    attack = BadNets(patch_size=1, poison_rate=0.1)
    attack.setup(data)
    poisoned = attack.poison_test(data.test)
    model = Classifier(PatchModel(), (0.0,), (1.0,))
    model.anchor = nn.Linear(1, 1)  # a parameter, so the model has a device
    context = make_services(data, attack, model, tmp_path, poisoned_test=poisoned)
    metrics = BrightnessFilter(fpr=0.05).run(context)
    assert metrics["defense/tpr"] == 100.0 and metrics["defense/roc_auc"] == pytest.approx(1.0)
    assert metrics["defense/asr_after_rejection"] == 0.0
    assert metrics["defense/fpr"] == pytest.approx(5.0, abs=0.5)  # held-out split == test split here
    # the model gets the 360 class-1 images right; rejections only take from that
    assert metrics["defense/acc_after_rejection"] + metrics["defense/acc_cost"] == pytest.approx(90.0)
    assert 0 < metrics["defense/acc_cost"] <= 5.5
    assert metrics["defense/time_per_input_ms"] > 0
    assert (tmp_path / HISTOGRAM_FILE).stat().st_size > 1000


@pytest.mark.parametrize("fpr", [0.0, 1.0, -0.1, 1.5])
def test_fpr_outside_the_open_unit_interval_is_a_config_error(fpr: float) -> None:
    with pytest.raises(ConfigError) as error:
        BrightnessFilter(fpr=fpr)
    assert error.value.field == "defense.fpr"
