"""Each metric on hand-built predictions, against its docs/metrics.md definition."""

from __future__ import annotations

import math

import pytest
import torch

from bdlab.metrics import accuracy, attack_success_rate, percent, target_confidence, true_class_confidence


def logits_for(predictions: list[int], classes: int = 3, scale: float = 10.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predictions), classes).float() * scale


def test_accuracy_percent() -> None:
    assert accuracy(logits_for([0, 1, 2, 2]), torch.tensor([0, 1, 2, 0])) == pytest.approx(75.0)


def test_asr_counts_target_predictions() -> None:
    assert attack_success_rate(logits_for([0, 0, 1, 2, 0]), target_class=0) == pytest.approx(60.0)
    assert math.isnan(attack_success_rate(torch.empty(0, 3), 0))


def test_tmc_averages_only_successful_inputs() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    p = torch.softmax(logits, 1)[:, 0]
    assert target_confidence(logits, 0) == pytest.approx(((p[0] + p[1]) / 2).item())
    assert math.isnan(target_confidence(logits_for([1, 2]), 0))


def test_ccc_is_mean_true_class_probability() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert true_class_confidence(logits, torch.tensor([0, 1])) == pytest.approx((0.5 + 0.25) / 2)


def test_percent_of_true_flags() -> None:
    assert percent(torch.tensor([True, False, True, True])) == pytest.approx(75.0)
    assert math.isnan(percent(torch.tensor([], dtype=torch.bool)))
