"""Neuron separation ratio (TrojanZoo Eq. 4) on hand-built activations and a hand-built model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bdlab.compose import compose_config
from bdlab.datasets.base import PoisonedTestSet
from bdlab.errors import ConfigError
from bdlab.models.classifier import Classifier
from bdlab.nsr import NSRSettings, model_nsr, neuron_separation
from bdlab.pipeline import prepare
from tests.conftest import TINY_RUN, make_services, make_splits


def test_same_top_neurons_give_zero_and_disjoint_ones_give_one() -> None:
    clean = torch.tensor([[5.0, 4.0, 0.0, 0.0], [5.0, 4.0, 0.0, 0.0]])
    assert neuron_separation(clean, clean * 2, k=2) == 0.0
    triggered = torch.tensor([[0.0, 0.0, 3.0, 6.0]])
    assert neuron_separation(clean, triggered, k=2) == 1.0


def test_partial_overlap_is_one_minus_the_jaccard_index() -> None:
    clean = torch.tensor([[9.0, 8.0, 7.0, 0.0, 0.0]])  # top-3: {0, 1, 2}
    triggered = torch.tensor([[9.0, 0.0, 7.0, 8.0, 0.0]])  # top-3: {0, 2, 3}
    assert neuron_separation(clean, triggered, k=3) == pytest.approx(1 - 2 / 4)


def test_the_means_over_inputs_pick_the_neurons_not_single_inputs() -> None:
    clean = torch.tensor([[10.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # means 5, 0, 1: top-1 is neuron 0
    triggered = torch.tensor([[0.0, 0.0, 3.0], [6.0, 0.0, 3.0]])  # means 3, 0, 3 ... tie broken by topk
    assert neuron_separation(clean, torch.tensor([[4.0, 9.0, 0.0]]), k=1) == 1.0
    assert neuron_separation(clean, clean[:1], k=1) == 0.0
    assert neuron_separation(triggered, triggered.flip(0), k=2) == 0.0


def test_bad_k_is_refused() -> None:
    with pytest.raises(ValueError):
        neuron_separation(torch.zeros(2, 3), torch.zeros(2, 3), k=4)


class Router(nn.Module):
    """Penultimate neurons 0-9 follow the image's left half, 10-19 its right half (the 'trigger' side)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Flatten()
        self.fc1 = nn.Linear(16, 20)
        with torch.no_grad():
            weight = torch.zeros(20, 16)
            left = torch.zeros(4, 4)
            left[:, :2] = 1
            weight[:10] = left.flatten()
            weight[10:] = (1 - left).flatten()
            self.fc1.weight.copy_(weight)
            self.fc1.bias.zero_()
        self.head = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc1(self.body(x))))


def test_model_nsr_separates_inputs_that_light_different_neurons() -> None:
    model = Classifier(Router(), (0.0,), (1.0,))
    clean = torch.zeros(8, 1, 4, 4, dtype=torch.uint8)
    clean[:, :, :, :2] = 200
    triggered = clean.clone()
    triggered[:, :, :, 2:] = 255
    assert model_nsr(model, clean, triggered) == 1.0  # the brighter right half takes the top 10%
    assert model_nsr(model, clean, clean.clone()) == 0.0


def test_settings_name_the_layer_and_k() -> None:
    """``nsr.layer`` and ``nsr.top_k`` reach the measurement: with k = all 20 neurons both inputs share the
    same set (NSR 0), with k = 10 they do not (NSR 1)."""
    model = Classifier(Router(), (0.0,), (1.0,))
    clean = torch.zeros(8, 1, 4, 4, dtype=torch.uint8)
    clean[:, :, :, :2] = 200
    triggered = clean.clone()
    triggered[:, :, :, 2:] = 255
    # the run's poisoned test images against their sources, test images 8..15 (0..7 look triggered already)
    data = make_splits(torch.cat([triggered, clean]), torch.zeros(16, dtype=torch.long))
    poisoned = PoisonedTestSet(triggered, torch.zeros(8, dtype=torch.long), torch.arange(8, 16))
    services = make_services(data, None, model, poisoned_test=poisoned)
    assert NSRSettings("fc1", 10).measure(model, services) == 1.0
    assert NSRSettings("fc1", 20).measure(model, services) == 0.0
    NSRSettings("fc1", 20).check(model, (1, 4, 4))


@pytest.mark.parametrize("overrides, field, words", [
    (["nsr.layer=conv9"], "nsr.layer", "conv2"),      # the line lists the layers
    (["nsr.top_k=85"], "nsr.top_k", "84 neurons"),    # LeNet's penultimate layer is fc2's 84
    (["nsr.layer=conv2", "nsr.top_k=17"], "nsr.top_k", "16 neurons"),
    (["nsr.top_k=0"], "nsr.top_k", ">= 1"),
])
def test_bad_nsr_settings_are_refused_before_training(overrides: list[str], field: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, *overrides]))
    assert info.value.field == field and words in str(info.value) and "\n" not in str(info.value)
