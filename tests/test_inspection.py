"""Model inspection: the anomaly index, MJS and #pixels on hand-built values, and the batched inversion engine."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from bdlab.attacks import BadNets, Targeted
from bdlab.compose import compose_config
from bdlab.defenses.model_inspection.base import (
    InspectionResult,
    anomaly_index,
    count_pixels,
    flagged_classes,
    inspection_metrics,
    mask_jaccard,
    median,
)
from bdlab.errors import ConfigError
from bdlab.inversion.engine import InversionEngine, InversionMethod, Schedule, Trigger
from bdlab.inversion.methods import CWL0Trigger, NeuralCleanseTrigger, PixelTrigger, UAPTrigger
from bdlab.models.classifier import Classifier
from bdlab.pipeline import prepare
from tests.conftest import TINY_RUN, make_splits

# ----------------------------------------------------------------------------- metrics on hand-built values


def test_median_of_an_even_count_is_the_mean_of_the_two_middle_values() -> None:
    assert median(torch.tensor([4.0, 1.0, 7.0, 6.0])) == 5.0
    assert median(torch.tensor([3.0, 1.0, 2.0])) == 2.0


def test_anomaly_index_on_hand_built_norms_odd_and_even() -> None:
    odd = anomaly_index(torch.tensor([1.0, 5.0, 5.0, 6.0, 7.0]))  # median 5, MAD median(4,0,0,1,2) = 1
    assert torch.allclose(odd, torch.tensor([4.0, 0.0, 0.0, 1.0, 2.0], dtype=torch.float64) / 1.4826)
    even = anomaly_index(torch.tensor([1.0, 4.0, 6.0, 7.0]))  # median 5, deviations 4,1,1,2: MAD 1.5
    assert even[0].item() == pytest.approx(4.0 / (1.4826 * 1.5))
    assert flagged_classes(torch.tensor([1.0, 5.0, 5.0, 6.0, 7.0]), 2.0) == [0]
    # a large outlier is anomalous too, but it is not a small trigger: not flagged
    assert flagged_classes(torch.tensor([5.0, 5.0, 5.1, 4.9, 50.0]), 2.0) == []
    same = anomaly_index(torch.tensor([3.0, 3.0, 3.0, 1.0]))  # MAD 0: only the off-median class stands out
    assert same[3] == math.inf and same[0] == 0


def test_mjs_scores_an_exact_binary_recovery_one() -> None:
    truth = torch.zeros(6, 6, dtype=torch.bool)
    truth[3:, 3:] = True
    assert mask_jaccard(truth.float(), truth) == 1.0  # a strict '>' on a binary mask would score this 0
    shifted = torch.zeros(6, 6)
    shifted[2:5, 3:] = 1.0  # one row up: 6 of 9 pixels shared
    assert mask_jaccard(shifted, truth) == pytest.approx(6 / 12)
    soft = truth.float() * 0.3 + 0.01  # binarised to the 9 largest pixels: the true ones
    assert mask_jaccard(soft, truth) == 1.0
    assert math.isnan(mask_jaccard(soft, torch.zeros(6, 6, dtype=torch.bool)))


def test_pixels_counts_positions_changed_by_a_level_in_any_channel() -> None:
    delta = torch.zeros(2, 3, 4, 4)
    delta[0, 0, 0, 0] = 0.5
    delta[0, 2, 0, 0] = -0.5  # the same pixel again: counted once
    delta[0, 1, 1, 1] = -2 / 255
    delta[0, 0, 2, 2] = 0.5 / 255  # below one level: no change
    mask = torch.zeros(2, 1, 4, 4)
    mask[1, 0, :2, :2] = 1.0
    mask[1, 0, 3, 3] = 0.5 / 255
    trigger = Trigger(mask, torch.zeros(2, 3, 4, 4), delta)
    assert count_pixels(trigger).tolist() == [2.0, 4.0]


def test_mjs_is_not_applicable_for_a_trigger_without_a_fixed_mask() -> None:
    data = make_splits(torch.zeros(40, 1, 8, 8, dtype=torch.uint8), torch.arange(40) % 4, 4)
    targeted = Targeted(patch_size=2)
    targeted.setup(data)
    trigger = Trigger(torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8), torch.zeros(4, 1, 8, 8))
    inspection = InspectionResult(torch.ones(4), "low", torch.zeros(4), [], 1.0, trigger, torch.zeros(4),
                                  {"loss": torch.tensor([0.5, 0.0, 0.0, 0.0])})
    assert math.isnan(inspection_metrics(inspection, "defense/", targeted)["defense/mjs"])
    badnets = BadNets(patch_size=2)
    badnets.setup(data)
    metrics = inspection_metrics(inspection, "defense/", badnets)
    assert not math.isnan(metrics["defense/mjs"]) and metrics["defense/trigger_loss"] == 0.5  # BadNets' target 0


def test_largest_aiv_is_taken_on_the_suspicious_side_only() -> None:
    scores = torch.tensor([1.0, 5.0, 5.0, 5.2, 4.8, 40.0])  # class 0 far below the median, class 5 farther above
    aiv = anomaly_index(scores)
    for side, expected in (("low", aiv[0]), ("high", aiv[5]), ("both", aiv[5])):
        result = InspectionResult(scores, side, aiv, flagged_classes(scores, 2.0, side), 1.0)
        metrics = inspection_metrics(result, "defense/clean_")
        assert metrics["defense/clean_aiv_max"] == pytest.approx(float(expected))
        assert "defense/aiv_target" not in metrics and "defense/clean_per_class/pixels" not in metrics
    assert flagged_classes(scores, 2.0, "low") == [0] and flagged_classes(scores, 2.0, "both") == [0, 5]


def test_without_an_attack_every_target_metric_is_not_applicable() -> None:
    from bdlab.attacks.base import NoAttack

    result = InspectionResult(torch.ones(3), "low", torch.zeros(3), [], 1.0)
    metrics = inspection_metrics(result, "defense/", NoAttack())
    assert all(math.isnan(metrics[f"defense/{key}"]) for key in ("aiv_target", "mln", "trigger_asr", "trigger_loss"))


# ----------------------------------------------------------------------------- the engine


class RegionModel(nn.Module):
    """Class k's logit follows the brightness of its own region of an 8x8 image; class 2's region is the
    single bottom-right pixel (a planted one-pixel backdoor), the others are 16-pixel blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        regions = torch.zeros(4, 8, 8)
        regions[0, :4, :4] = 1
        regions[1, :4, 4:] = 1
        regions[2, 7, 7] = 1
        regions[3, 4:, :4] = 1
        self.register_buffer("regions", regions / regions.flatten(1).sum(1)[:, None, None])

    def forward(self, x: Tensor) -> Tensor:
        return 20 * (torch.einsum("nhw,khw->nk", x[:, 0], self.regions) - 0.5) + self.anchor


def planted() -> tuple[Classifier, Tensor, Tensor]:
    model = Classifier(RegionModel(), (0.0,), (1.0,))
    x = torch.rand(96, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.45
    return model, x, model(x).argmax(1)


def test_the_engine_recovers_a_planted_trigger_and_flags_its_class() -> None:
    model, x, y = planted()
    result = InversionEngine(NeuralCleanseTrigger(), epochs=60, batch_size=32).run(model, x, y, list(range(4)))
    assert result.reached.all() and (result.success >= 0.99).all()
    assert result.size[2] < 2.0 and result.size[[0, 1, 3]].min() > 4 * result.size[2]
    assert result.trigger.footprint[2, 0].flatten().argmax().item() == 63  # the bottom-right pixel
    assert flagged_classes(result.size) == [2]


def test_batched_and_sequential_modes_agree() -> None:
    model, x, y = planted()
    batched = InversionEngine(NeuralCleanseTrigger(), epochs=15, mode="batched").run(model, x, y, list(range(4)))
    sequential = InversionEngine(NeuralCleanseTrigger(), epochs=15, mode="sequential").run(model, x, y,
                                                                                        list(range(4)))
    assert torch.allclose(batched.size, sequential.size, rtol=1e-4)
    assert torch.allclose(batched.trigger.mask, sequential.trigger.mask, atol=1e-5)
    assert torch.equal(batched.epochs, sequential.epochs)


def test_pixel_and_uap_triggers_flip_the_planted_backdoor_with_their_own_sizes() -> None:
    model, x, y = planted()
    pixel = InversionEngine(PixelTrigger(), epochs=60, threshold=0.9).run(model, x, y, [2])
    assert pixel.reached.all() and pixel.size[0] <= 3 and count_pixels(pixel.trigger)[0] == pixel.size[0]
    uap = InversionEngine(UAPTrigger(epsilon=0.6), epochs=20, threshold=0.9).run(model, x, y, [2])
    assert uap.success[0] >= 0.9 and uap.trigger.delta.abs().max() <= 0.6 + 1e-6


class Scripted(InversionMethod):
    """A method whose size follows a script, one value per epoch, and whose trigger records the epoch."""

    regularised = True

    def __init__(self, sizes: list[float]) -> None:
        self.sizes, self.epoch = sizes, 0

    def variables(self, targets, shape, seed):
        return {"v": [torch.zeros(1) for _ in targets]}

    def stamp(self, variables, index, x):
        return x + 0 * variables["v"][index[0]]

    def regulariser(self, variables, index, x):
        return torch.stack([variables["v"][k].sum() for k in index])

    def size(self, variables, index):
        value = self.sizes[min(self.epoch, len(self.sizes) - 1)]
        return torch.full((len(index),), value)

    def end_epoch(self, *args) -> None:
        self.epoch += 1

    def trigger(self, variables, index):
        epoch = torch.full((len(index), 1, 2, 2), float(self.epoch))
        return Trigger(epoch, torch.zeros(len(index), 1, 2, 2), torch.zeros(len(index), 1, 2, 2))


class Target(nn.Module):
    """Always class 1, except for the epochs a script marks as misses (class 0)."""

    def __init__(self, hits: list[bool], steps: int) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))
        self.hits, self.steps, self.calls = hits, steps, 0

    def forward(self, x: Tensor) -> Tensor:
        epoch = min(self.calls // self.steps, len(self.hits) - 1)
        self.calls += 1
        logits = torch.zeros(len(x), 2)
        logits[:, 1 if self.hits[epoch] else 0] = 5.0
        return logits + 0 * self.anchor


def test_the_best_trigger_is_returned_not_the_last() -> None:
    sizes = [9.0, 7.0, 3.0, 6.0, 8.0, 8.0]  # the best (3) comes at epoch 2, later ones are worse
    model = Target([True] * 6, steps=1)
    x, y = torch.rand(8, 1, 2, 2), torch.zeros(8, dtype=torch.long)
    result = InversionEngine(Scripted(sizes), epochs=6, batch_size=8).run(model, x, y, [1])
    assert result.size.item() == 3.0 and result.trigger.mask.flatten()[0].item() == 2.0  # epoch 2's trigger


def test_a_class_stops_early_once_lambda_went_up_and_down_and_its_best_is_stale() -> None:
    hits = [True, True, False, False] + [False] * 20  # lambda up after 2 hits, down after 2 misses, then stale
    schedule = Schedule(init=1e-3, patience=2, early_stop_patience=3)
    model = Target(hits, steps=1)
    x, y = torch.rand(8, 1, 2, 2), torch.zeros(8, dtype=torch.long)
    result = InversionEngine(Scripted([5.0] * 24), epochs=24, batch_size=8, schedule=schedule).run(model, x, y, [1])
    assert result.epochs.item() < 24 and result.reached.item()
    always = InversionEngine(Scripted([5.0] * 24), epochs=24, batch_size=8, schedule=schedule)
    assert always.run(Target([True] * 24, steps=1), x, y, [1]).epochs.item() == 24  # lambda never went down


class PerStart(Scripted):
    """A method whose trigger size is fixed by the seed it starts from: restart 1 (seed + 1009) is the smallest."""

    trainable = ("v",)

    def __init__(self) -> None:
        super().__init__([0.0])

    def variables(self, targets, shape, seed):
        return {"v": [torch.zeros(1) for _ in targets],
                "start": [torch.tensor([abs(seed % 1000 - 9) + 1.0 + k]) for k, _ in enumerate(targets)]}

    def size(self, variables, index):
        return torch.stack([variables["start"][k][0] for k in index])

    def trigger(self, variables, index):
        size = torch.stack([variables["start"][k][0] for k in index]).view(-1, 1, 1, 1).expand(-1, 1, 2, 2)
        return Trigger(size.clone(), torch.zeros(len(index), 1, 2, 2), torch.zeros(len(index), 1, 2, 2))


def test_restarts_keep_each_class_best_start_not_the_first_or_the_last() -> None:
    model = Target([True] * 4, steps=1)
    x, y = torch.rand(8, 1, 2, 2), torch.zeros(8, dtype=torch.long)
    result = InversionEngine(PerStart(), epochs=4, batch_size=8, restarts=3).run(model, x, y, [1, 1])
    assert result.size.tolist() == [1.0, 2.0]  # starts 10, 1, 10 (+k): the middle one, per class
    assert result.trigger.mask[:, 0, 0, 0].tolist() == [1.0, 2.0] and result.epochs.tolist() == [12, 12]


def test_restarts_never_return_a_larger_trigger_than_a_single_start() -> None:
    model, x, y = planted()
    single = InversionEngine(NeuralCleanseTrigger(), epochs=15).run(model, x, y, list(range(4)))
    several = InversionEngine(NeuralCleanseTrigger(), epochs=15, restarts=2).run(model, x, y, list(range(4)))
    assert (several.size <= single.size + 1e-5).all() and (several.epochs > single.epochs).all()
    cw = InversionEngine(CWL0Trigger(), epochs=4, threshold=0.9, restarts=2).run(model, x, y, [2])
    assert cw.size[0] < 64  # the pruned mask of the non-trainable "allowed" variable shrank


# ----------------------------------------------------------------------------- the protocol and bad input


def test_inspection_protocol_end_to_end_on_the_tiny_run(tmp_path: Path, tmp_path_factory) -> None:
    from bdlab.pipeline import execute
    from tests.test_transforms import shared_cache

    cfg = compose_config([*TINY_RUN, "attack.patch_size=4", "attack.poison_rate=0.2", "defense=neural_cleanse",
                          "defense.epochs=20", "dataset.defense_fraction=0.4", "defense.optimisation_images=64",
                          "defense.evaluation_images=50", f"cache_dir={shared_cache(tmp_path_factory)}"])
    experiment = prepare(cfg)
    metrics = execute(experiment, tmp_path / "run", [])["metrics"]
    assert len(metrics["defense/per_class/size"]) == 10 and len(metrics["defense/clean_per_class/aiv"]) == 10
    assert metrics["defense/aiv_target"] == pytest.approx(metrics["defense/per_class/aiv"][0])
    assert metrics["defense/target_flagged"] == float(0 in metrics["defense/flagged_classes"])
    assert 0.0 <= metrics["defense/mjs"] <= 1.0 and metrics["defense/art_s"] > 0
    assert metrics["defense/per_class/score"] == metrics["defense/per_class/size"]  # the mask's L1 norm
    assert metrics["defense/trigger_loss"] == metrics["defense/per_class/loss"][0]
    assert (tmp_path / "run" / "inspection_trojan.png").is_file()
    assert list((shared_cache(tmp_path_factory) / "inspection" / "neural_cleanse").glob("*/tensors.safetensors"))


@pytest.mark.parametrize("overrides, field", [
    (["defense=neural_cleanse", "defense.epochs=0"], "defense.epochs"),
    (["defense=neural_cleanse", "defense.batch_size=0"], "defense.batch_size"),
    (["defense=neural_cleanse", "defense.optimisation_images=0"], "defense.optimisation_images"),
    (["defense=neural_cleanse", "defense.evaluation_images=0"], "defense.evaluation_images"),
    (["defense=neural_cleanse", "defense.optimisation_images=100000"], "defense.optimisation_images"),
    (["defense=neural_cleanse", "defense.threshold=0"], "defense.threshold"),
    (["defense=neural_cleanse", "defense.threshold=1.5"], "defense.threshold"),
    (["defense=neural_cleanse", "defense.init_weight=-1"], "defense.init_weight"),
    (["defense=pixel", "defense.init_weight=-0.1"], "defense.init_weight"),
    (["defense=neural_cleanse", "defense.up=1"], "defense.up"),
    (["defense=pixel", "defense.down=0.5"], "defense.down"),
    (["defense=pixel", "defense.gamma=0"], "defense.gamma"),
    (["defense=tabor", "defense.weights=[1,2]"], "defense.weights"),
    (["defense=k_arm", "defense.candidates=0"], "defense.candidates"),
    (["defense=k_arm", "defense.candidates=11"], "defense.candidates"),
])
def test_bad_inspection_values_are_refused_before_training(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, *overrides]))
    assert info.value.field == field and "\n" not in str(info.value)
    if "defense.candidates=11" in overrides:
        assert "at most 10" in str(info.value)
