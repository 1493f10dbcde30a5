"""Many models' triggers inverted at once: stacked weights, the engine's multi-model form and ``inspect_many``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from bdlab.attacks.base import NoAttack
from bdlab.defenses.model_inspection.base import flagged_classes
from bdlab.defenses.model_inspection.k_arm import KArm
from bdlab.defenses.model_inspection.neural_cleanse import NeuralCleanse
from bdlab.defenses.model_inspection.pixel import Pixel
from bdlab.inversion.engine import ClassState, EpochScheduler, InversionEngine, InversionMethod, Schedule
from bdlab.inversion.methods import CWL0Trigger, NeuralCleanseTrigger, TaborTrigger
from bdlab.inversion import stacked
from bdlab.inversion.stacked import StackedModels, architecture
from bdlab.models.classifier import Classifier
from tests.conftest import make_services, make_splits

CLASSES = 4
# a fast schedule, so a few epochs on 64 images find the planted one-pixel triggers
FAST = {"lr": 1.0, "init_weight": 0.03, "patience": 2}


class Planted(nn.Module):
    """Class k's logit follows the brightness of its 4x4 quarter of an 8x8 image, through a convolution and an
    eval-mode BatchNorm with its own running statistics; a ``target`` class's region is instead one pixel (a
    planted one-pixel backdoor). ``seed`` jitters the weights, so no two models are alike."""

    def __init__(self, target: int | None, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        regions = torch.zeros(CLASSES, 8, 8)
        for k, (row, column) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):
            regions[k, row:row + 4, column:column + 4] = 1
        if target is not None:
            regions[target] = 0
            regions[target, 7 - target, 7] = 1
        self.conv = nn.Conv2d(1, CLASSES, 8)
        self.norm = nn.BatchNorm2d(CLASSES)
        with torch.no_grad():
            weight = 20 * regions / regions.flatten(1).sum(1)[:, None, None]
            self.conv.weight.copy_(weight[:, None] + 0.01 * torch.randn(CLASSES, 1, 8, 8, generator=generator))
            self.conv.bias.fill_(-10.0)
            self.norm.running_mean.copy_(0.1 * torch.randn(CLASSES, generator=generator))

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x)).flatten(1)


def population(targets: list[int | None]) -> list[Classifier]:
    return [Classifier(Planted(target, seed), (0.0,), (1.0,)).eval() for seed, target in enumerate(targets)]


def images(count: int = 64) -> tuple[Tensor, Tensor]:
    """Dark float images on 8-bit levels, labelled by a clean model."""
    x = (torch.rand(count, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.45 * 255).round() / 255
    return x, population([None])[0](x).argmax(1)


def fast_engine(method: InversionMethod, epochs: int, threshold: float = 0.99) -> InversionEngine:
    return InversionEngine(method, epochs=epochs, lr=FAST["lr"], threshold=threshold,
                           schedule=Schedule(init=FAST["init_weight"], patience=FAST["patience"]))


def assert_same_results(many, alone) -> None:
    """The multi-model run's results are the one-model runs', up to the rounding of the stacked forward."""
    for a, b in zip(many, alone, strict=True):
        assert torch.equal(a.epochs, b.epochs) and torch.equal(a.reached, b.reached)
        assert torch.allclose(a.size, b.size, rtol=1e-3, atol=1e-6)
        assert torch.allclose(a.trigger.footprint, b.trigger.footprint, atol=1e-3)
        assert flagged_classes(a.size) == flagged_classes(b.size)


# ----------------------------------------------------------------------------- stacked weights


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_stacked_models_run_each_row_on_its_own_model(strategy: str) -> None:
    models = population([0, 1, None])
    x = torch.rand(3 * 5, 1, 8, 8)
    together = StackedModels(models, strategy)
    expected = torch.cat([model(part) for model, part in zip(models, x.split(5))])
    assert torch.allclose(together(x), expected, atol=1e-5)
    chosen = together.select([2, 0])(x[:10])
    assert torch.allclose(chosen, torch.cat([models[2](x[:5]), models[0](x[5:10])]), atol=1e-5)
    with pytest.raises(ValueError, match="model by model"):
        together(x[:7])
    other = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, CLASSES)), (0.0,), (1.0,))
    assert architecture(models[0]) == architecture(models[1]) != architecture(other)
    with pytest.raises(ValueError, match="one architecture"):
        StackedModels([models[0], other])


# ----------------------------------------------------------------------------- the engine's multi-model form


@pytest.mark.parametrize("method, threshold, strategy", [(TaborTrigger, 0.99, "vmap"), (CWL0Trigger, 0.9, "loop")],
                         ids=["tabor_vmap", "cw_l0"])
def test_methods_that_run_the_model_themselves_run_each_slot_on_its_own_model(method, threshold, strategy,
                                                                              monkeypatch) -> None:
    # TABOR's fixed terms run the model on each slot's images; CW's pruning runs it once per model after an epoch
    monkeypatch.setattr(stacked, "default_strategy", lambda device: strategy)  # the GPU's on this CPU too
    models, (x, y) = population([0, 1, None]), images()
    engine = fast_engine(method(), 3, threshold)
    alone = [engine.run(model, x, y, list(range(CLASSES))) for model in models]
    assert_same_results(engine.run_many(models, x, y, list(range(CLASSES))), alone)


class StopOne(EpochScheduler):
    """Optimises every live class, and stops class ``stop`` at epoch ``at``."""

    def __init__(self, stop: int, at: int) -> None:
        self.stop, self.at = stop, at

    def select(self, epoch: int, live: list[int], states: list[ClassState]) -> list[int]:
        if epoch >= self.at:
            states[self.stop].stopped = True
        return [k for k in live if not states[k].stopped]


class Recording(NeuralCleanseTrigger):
    """Neural Cleanse's trigger, keeping every slot's mask variable after each epoch."""

    def __init__(self) -> None:
        self.masks: list[Tensor] = []

    def end_epoch(self, model, variables, index, x, labels, targets, success, threshold) -> None:
        self.masks.append(torch.stack([v.detach().clone() for v in variables["mask"]]))


def test_a_stopped_slot_stays_where_it_stopped_while_the_other_models_go_on() -> None:
    # model 0 stops its class 1 at epoch 2: it then runs 3 classes beside the others' 4, padded to 4 in the batch
    models, (x, y) = population([0, 1, None]), images()
    method = Recording()
    engine = fast_engine(method, epochs=5)
    many = engine.run_many(models, x, y, list(range(CLASSES)), schedulers=[StopOne(1, 2), None, None])
    alone = [engine.run(model, x, y, list(range(CLASSES)), scheduler=StopOne(1, 2) if m == 0 else None)
             for m, model in enumerate(models)]
    assert_same_results(many, alone)
    assert many[0].epochs.tolist() == [5, 2, 5, 5] and many[1].epochs.tolist() == [5] * CLASSES
    stopped = [masks[1] for masks in method.masks[:3 * 5]]  # slot 1 is model 0's class 1; one record per model
    assert not torch.equal(stopped[0], stopped[3])  # it moved while it ran (epochs 0-1: records 0-5)
    assert all(torch.equal(mask, stopped[5]) for mask in stopped[6:])  # and not once stopped, Adam's momentum too


# ----------------------------------------------------------------------------- inspect_many


def scan_setup(tmp_path: Path, name: str):
    models, (x, y) = population([0, 1, None]), images(96)
    data = make_splits((x * 255).round().to(torch.uint8), y, CLASSES)
    return models, data, make_services(data, NoAttack(), models[0], tmp_path / name), [f"model{i}" for i in range(3)]


@pytest.mark.parametrize("inspector", [
    NeuralCleanse(epochs=4, optimisation_images=64, evaluation_images=32, **FAST),
    KArm(screen_epochs=2, candidates=2, epochs=8, optimisation_images=64, evaluation_images=32, **FAST),
], ids=["neural_cleanse", "k_arm"])
def test_batched_inspection_gives_the_one_at_a_time_verdicts(tmp_path: Path, inspector) -> None:
    models, data, services, keys = scan_setup(tmp_path, "one")
    alone = [inspector.inspect(model, data, services, key) for model, key in zip(models, keys)]
    _, _, services, _ = scan_setup(tmp_path, "many")
    many = inspector.inspect_many(models, data, services, keys)
    for a, b in zip(many, alone, strict=True):
        assert a.flagged == b.flagged and torch.equal(a.extras["epochs"], b.extras["epochs"])
        assert torch.allclose(a.scores, b.scores, rtol=1e-3)
        assert torch.allclose(a.success, b.success, atol=1.0)  # held-out ASR in %: one image of 32 is 3.1
    if isinstance(inspector, KArm):  # each model's own bandit: they chose differently
        assert len({tuple(r.extras["epochs"].tolist()) for r in many}) > 1
    else:  # each model's own planted class, none in the clean one
        assert [r.flagged for r in many] == [[0], [1], []]


def test_inspect_many_takes_cached_models_from_the_cache_and_stores_the_others(tmp_path: Path, monkeypatch) -> None:
    models, data, services, keys = scan_setup(tmp_path, "cache")
    inspector = NeuralCleanse(epochs=2, optimisation_images=64, evaluation_images=32, **FAST)
    first = inspector.inspect(models[0], data, services, keys[0])
    inverted: list[int] = []
    run_many = inspector.engine.run_many

    def spy(group, *args, **kwargs):
        inverted.append(len(group))
        return run_many(group, *args, **kwargs)

    monkeypatch.setattr(inspector.engine, "run_many", spy)
    many = inspector.inspect_many(models, data, services, keys)
    assert inverted == [2]  # model 0 came from the cache
    assert torch.equal(many[0].scores, first.scores) and many[0].seconds == first.seconds
    assert many[1].seconds == many[2].seconds > 0  # the pair's wall time, halved

    def no_inversion(*args, **kwargs):
        raise AssertionError("a cached inspection was inverted again")

    monkeypatch.setattr(inspector.engine, "run", no_inversion)
    monkeypatch.setattr(inspector.engine, "run_many", no_inversion)
    later = inspector.inspect(models[2], data, services, keys[2])  # one model, the key inspect() uses
    assert torch.equal(later.scores, many[2].scores) and later.seconds == many[2].seconds
    assert torch.equal(later.trigger.mask, many[2].trigger.mask) and torch.equal(later.success, many[2].success)
    stored = tmp_path / "cache" / "cache" / "inspection" / "neural_cleanse"
    assert len(list(stored.glob("*/tensors.safetensors"))) == 3


@pytest.mark.parametrize("inspector", [
    NeuralCleanse(epochs=1, mode="sequential", optimisation_images=64, evaluation_images=32),
    Pixel(schedule="released", steps=2, optimisation_images=64, evaluation_images=32),
], ids=["sequential", "pixel_released"])
def test_inspectors_that_do_not_stack_inspect_one_model_at_a_time(tmp_path: Path, monkeypatch, inspector) -> None:
    models, data, services, keys = scan_setup(tmp_path, "single")

    def refuse(*args, **kwargs):
        raise AssertionError("stacked an inspector that runs one model at a time")

    monkeypatch.setattr(InversionEngine, "run_many", refuse)
    assert not inspector.stacks_models()
    many = inspector.inspect_many(models[:2], data, services, keys[:2])
    assert [r.scores.tolist() for r in many] == [inspector.inspect(m, data, services, k).scores.tolist()
                                                 for m, k in zip(models[:2], keys[:2])]
