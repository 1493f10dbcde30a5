"""STRIP: entropy on constant vs input-dependent models, bad input, and `attack=refool defense=strip`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from bdlab.compose import compose_config
from bdlab.defenses.input_filtering.base import HISTOGRAM_FILE
from bdlab.defenses.input_filtering.strip import STRIP, mean_entropy, mixtures
from bdlab.errors import ConfigError
from bdlab.pipeline import execute, prepare
from tests.conftest import TINY_RUN


class Constant(nn.Module):
    """The same confident prediction whatever the input: a fully dominating trigger."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tensor([10.0, 0.0, 0.0]).expand(len(x), 3)


class Brightness(nn.Module):
    """A soft prediction that follows the mean brightness, so mixing with other images changes it."""

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean((1, 2, 3))
        return 4 * torch.stack([mean, 1 - mean, torch.full_like(mean, 0.5)], 1)


class Step(nn.Module):
    """Confidently class 0 for dark inputs, class 1 for bright ones."""

    def forward(self, x: Tensor) -> Tensor:
        bright = (x.mean((1, 2, 3)) >= 0.25).float()
        return 20 * torch.stack([1 - bright, bright], 1)


def mean_mixture_entropy(model: nn.Module, x: Tensor, overlays: Tensor) -> Tensor:
    """STRIP's score path on a hand-built model: equal mixing, the logits of every mixture, their mean entropy."""
    return mean_entropy(model(mixtures(x, overlays, 0.5)).view(*overlays.shape[:2], -1))


def test_entropy_is_zero_for_a_constant_model_and_high_for_an_input_dependent_one() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=generator)
    overlays = torch.rand(4, 16, 1, 8, 8, generator=generator)
    constant = mean_mixture_entropy(Constant(), x, overlays)
    varying = mean_mixture_entropy(Brightness(), x, overlays)
    assert torch.all(constant < 1e-3)
    assert torch.all(varying > 0.5)


def test_entropy_is_averaged_over_the_mixtures_not_taken_of_the_averaged_prediction() -> None:
    x = torch.zeros(1, 1, 2, 2)
    overlays = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])[None]  # mixtures of brightness 0 and 0.5
    # each mixture is classified confidently (low entropy) though the two predictions differ,
    # so the entropy of the averaged prediction would be ln 2
    entropy = mean_mixture_entropy(Step(), x, overlays)
    assert entropy.item() < 0.1


def test_more_overlays_than_the_held_out_split_is_refused() -> None:
    with pytest.raises(ConfigError) as error:
        prepare(compose_config([*TINY_RUN, "defense=strip", "defense.num_overlays=100"]))  # held-out split: 15
    assert error.value.field == "defense.num_overlays"


@pytest.mark.parametrize("kwargs, field", [({"alpha": 1.0}, "defense.alpha"), ({"num_overlays": 0}, "defense.num_overlays"),
                                           ({"fpr": 1.0}, "defense.fpr")])
def test_bad_parameters_are_config_errors(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        STRIP(**kwargs)
    assert error.value.field == field


@pytest.mark.parametrize("channels", [1, 3])
def test_refool_with_strip_end_to_end(tmp_path: Path, channels: int) -> None:
    """The pipeline in-process (the CLI wrapper is covered by test_run and the exit-2 test below)."""
    cfg = compose_config([*TINY_RUN, "attack=refool", "defense=strip", f"dataset.channels={channels}",
                          "attack.sigma=[0.5,1.5]", "attack.ghost_offset=[1,3]", "defense.num_overlays=8",
                          "dataset.defense_fraction=0.1", "defense.max_inputs=200", "dataset.train_size=1000",
                          "trainer.max_epochs=3", f"cache_dir={tmp_path / 'cache'}"])
    experiment = prepare(cfg)
    assert experiment.attack.display_name == "refool" and experiment.defense.name == "strip"
    metrics = execute(experiment, tmp_path / "run", [])["metrics"]
    for key in ("tpr", "fpr", "roc_auc", "asr_after_rejection", "acc_cost", "time_per_input_ms", "threshold"):
        assert f"defense/{key}" in metrics
    assert 0.0 <= metrics["defense/roc_auc"] <= 1.0 and 0.0 <= metrics["defense/tpr"] <= 100.0
    # a rejected poisoned input is a failed attack
    assert metrics["defense/asr_after_rejection"] <= 100.0 - metrics["defense/tpr"] + 1e-9
    assert (tmp_path / "run" / HISTOGRAM_FILE).is_file()
    assert any((tmp_path / "cache" / "poisoned" / "refool").iterdir())  # poisoned images kept as uint8


class TriggerDominated(nn.Module):
    """Class 0, confidently, whenever the bottom-right pixel is bright (the trigger survives a 50/50
    mix with any overlay); otherwise a soft prediction that follows the image's brightness."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # so the model has a device

    def forward(self, x: Tensor) -> Tensor:
        trigger = (x[:, 0, -1, -1] > 0.45).float()[:, None]
        mean = x.mean((1, 2, 3))
        soft = 3 * torch.stack([mean, 1 - mean, 0.5 * torch.ones_like(mean)], 1)
        return trigger * torch.tensor([30.0, 0.0, 0.0]) + (1 - trigger) * soft


def test_strip_scores_triggered_inputs_as_more_suspicious() -> None:
    from bdlab.attacks.badnets import BadNets
    from tests.conftest import make_services, make_splits

    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 100, (60, 1, 8, 8), dtype=torch.uint8, generator=generator)
    data = make_splits(images, torch.arange(60) % 3, num_classes=3)
    attack = BadNets(patch_size=1)
    attack.setup(data)
    model = TriggerDominated()
    context = make_services(data, attack, model, poisoned_test=attack.poison_test(data.test))
    defense = STRIP(num_overlays=16)
    clean_scores = defense.scores(context, data.test.images)
    triggered_scores = defense.scores(context, attack.stamp(data.test.images))
    # a trigger that dominates every mixture keeps the entropy near 0: the score (-entropy) is the highest
    assert triggered_scores.min() > clean_scores.max()
    assert triggered_scores.max() <= 0.0 and triggered_scores.min() > -0.01
