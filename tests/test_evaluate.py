"""The one evaluator against hand-built predictions, and the defense deltas computed from it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from bdlab.datasets.base import ImageSet
from bdlab.evaluate import defense_effect, evaluate, predict
from bdlab.models.classifier import PENULTIMATE, Classifier


class ByFirstPixel(nn.Module):
    """Logits read off the first pixel: value v in [0, 1] -> class round(3 v), confidence by the 4th pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # so the model has a device

    def forward(self, x: Tensor) -> Tensor:
        predicted = (x[:, 0, 0, 0] * 3).round().long()
        confidence = x[:, 0, 0, 3] * 10
        return nn.functional.one_hot(predicted, 4).float() * confidence[:, None]


def images(classes: list[int], confidence: float = 1.0) -> Tensor:
    x = torch.zeros(len(classes), 1, 1, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = (torch.tensor(classes) * 255 / 3).round().to(torch.uint8)
    x[:, 0, 0, 3] = round(confidence * 255)
    return x


def test_acc_ccc_asr_tmc_from_hand_built_predictions() -> None:
    clean = ImageSet(images([0, 1, 2, 3, 1]), torch.tensor([0, 1, 2, 0, 1]))  # 4 of 5 right
    poisoned = ImageSet(images([0, 0, 2, 0]), torch.tensor([1, 2, 2, 3]))  # 3 of 4 reach target 0
    result = evaluate(ByFirstPixel(), clean, poisoned, target_class=0)
    assert result.acc == pytest.approx(80.0) and result.asr == pytest.approx(75.0)
    p = math.exp(10) / (math.exp(10) + 3)  # softmax of a one-hot logit of 10 over 4 classes
    assert result.tmc == pytest.approx(p, rel=1e-6)  # over the 3 successful inputs only
    assert result.ccc == pytest.approx((4 * p + (1 - p) / 3) / 5, rel=1e-6)
    assert set(result.metrics("trojan")) == {"trojan/acc", "trojan/ccc", "trojan/asr", "trojan/tmc"}


def test_transform_applies_to_every_input_and_missing_sets_are_not_applicable() -> None:
    clean = ImageSet(images([1, 1]), torch.tensor([1, 1]))
    to_class_two = lambda x: torch.cat([torch.full_like(x[..., :1], 2 / 3), x[..., 1:]], -1)  # noqa: E731
    after = evaluate(ByFirstPixel(), clean, ImageSet(images([1]), torch.tensor([1])), 2, to_class_two)
    assert after.acc == 0.0 and after.asr == 100.0
    only_clean = evaluate(ByFirstPixel(), clean, None, 2)
    assert math.isnan(only_clean.asr) and set(only_clean.metrics("clean")) == {"clean/acc", "clean/ccc"}


def test_defense_effect_is_before_minus_after() -> None:
    clean = ImageSet(images([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3]))
    poisoned = ImageSet(images([0, 0, 1, 0]), torch.tensor([1, 2, 1, 3]))
    before = evaluate(ByFirstPixel(), clean, poisoned, 0)
    halve = lambda x: torch.cat([(x[..., :1] * 0.5), x[..., 1:]], -1)  # noqa: E731 (classes 0,1,2,3 -> 0,0,1,2)
    after = evaluate(ByFirstPixel(), clean, poisoned, 0, halve)
    metrics = defense_effect(before, after)
    assert metrics["defense/acc_before"] == 100.0 and metrics["defense/acc"] == 25.0
    assert metrics["defense/cad"] == pytest.approx(75.0)
    assert metrics["defense/asr_before"] == 75.0 and metrics["defense/asr"] == 100.0
    assert metrics["defense/ard"] == pytest.approx(-25.0)


def small_classifier() -> Classifier:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    return Classifier(net, (0.5,), (0.25,)).train()  # left in training mode: predict() switches to eval


def test_predict_reads_uint8_and_float_layers_and_chunks_like_one_pass() -> None:
    model = small_classifier()
    x = torch.randint(0, 256, (7, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    expected = model.eval()(x.float() / 255)
    model.train()
    logits = predict(model, x, batch_size=3)  # chunks of 3, 3 and 1
    assert not model.training and logits.dtype == torch.float32 and torch.allclose(logits, expected, atol=1e-6)
    assert torch.allclose(predict(model, x.float() / 255), logits, atol=1e-6)  # float input in [0, 1] as it is
    assert torch.allclose(predict(model, x, batch_size=100), logits, atol=1e-6)
    one = predict(model, x, layers="0")  # one name: a tensor of that layer
    both = predict(model, x, layers=["0", PENULTIMATE], batch_size=2)  # a list: a dict
    assert one.shape == (7, 3, 4, 4) and set(both) == {"0", PENULTIMATE}
    assert torch.allclose(both["0"], one, atol=1e-6) and both[PENULTIMATE].shape == (7, 48)
    assert torch.allclose(both[PENULTIMATE], model.features(x.float() / 255, PENULTIMATE).detach(), atol=1e-6)
    flipped = predict(model, x, transform=lambda batch: 1 - batch, batch_size=3)  # per chunk, before the model
    assert torch.allclose(flipped, model(1 - x.float() / 255).detach(), atol=1e-6)
