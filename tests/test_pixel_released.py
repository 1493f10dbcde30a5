"""Pixel as its authors' released code runs it (``defense.schedule=released``) and K-Arm with Pixel's
optimisation (``defense.optimisation=pixel``): the release's rules one by one, on hand-built values and a
hand-built linear model whose backdoor is one known pixel."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from bdlab.compose import compose_config
from bdlab.datasets.base import ImageSet, to_uint8
from bdlab.defenses.model_inspection.base import count_pixels, flagged_classes
from bdlab.defenses.model_inspection.k_arm import KArm
from bdlab.defenses.model_inspection.pixel import Pixel
from bdlab.errors import ConfigError
from bdlab.inversion.engine import InversionEngine, Schedule
from bdlab.inversion.methods import LEVEL, PixelTrigger
from bdlab.inversion.released import ReleasedPixelEngine, ReleaseTracker, release_accepts
from bdlab.pipeline import prepare
from bdlab.run import cli
from tests.conftest import TINY_RUN
from tests.test_bad_input import assert_refused


def backdoored() -> tuple[nn.Module, Tensor, Tensor]:
    """A linear model over 8x8 grey images: class k's logit follows the brightness of its region; class 0's
    region is the single bottom-right pixel (the backdoor: that pixel alone sends an image to 0), the
    others are 16-pixel blocks. Images are darker than 0.45, labelled by the model."""
    regions = torch.zeros(4, 8, 8)
    regions[0, 7, 7] = 1
    regions[1, :4, :4] = regions[2, :4, 4:] = regions[3, 4:, :4] = 1
    linear = nn.Linear(64, 4)
    with torch.no_grad():
        linear.weight.copy_(20 * (regions / regions.flatten(1).sum(1)[:, None, None]).flatten(1))
        linear.bias.fill_(-10.0)
    model = nn.Sequential(nn.Flatten(), linear)
    x = torch.rand(96, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.45
    return model, x, model(x).argmax(1)


class Counting(nn.Module):
    """Counts the forward calls of the model it wraps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.model(x)


class AlwaysTarget(nn.Module):
    """Sends every image to class 1 (any trigger reaches the threshold)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        logits = torch.zeros(len(x), 2)
        logits[:, 1] = 5.0
        return logits + 0 * self.anchor * x.flatten(1).sum(1, keepdim=True)


# ----------------------------------------------------------------------------- the release's rules


def test_a_new_best_needs_the_threshold_and_both_measures_to_shrink() -> None:
    best_regulariser, best_pixels = torch.full((6,), 10.0), torch.full((6,), 5.0)
    success = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.89, 0.9])
    regulariser = torch.tensor([9.0, 9.0, 11.0, 10.0, 1.0, 9.0])
    pixels = torch.tensor([4.0, 5.0, 3.0, 4.0, 1.0, 4.0])
    accepted = release_accepts(success, regulariser, pixels, best_regulariser, best_pixels, 0.9)
    # both shrink | pixels equal | regulariser grows | regulariser equal | below the threshold | at it
    assert accepted.tolist() == [True, False, False, False, False, True]


def test_the_tracker_keeps_the_best_not_the_last_and_moves_alpha_after_patience_steps() -> None:
    schedule = Schedule(init=1.0, up=2.0, down=4.0, patience=2)
    tracker = ReleaseTracker.start(1, (1, 1, 1), schedule.init, torch.device("cpu"))
    steps = [  # success, regulariser, pixels: accepted?
        (1.0, 10.0, 5.0, True),   # the first trigger at the threshold
        (1.0, 9.0, 6.0, False),   # more pixels
        (1.0, 11.0, 3.0, False),  # a larger regulariser
        (0.5, 1.0, 1.0, False),   # below the threshold
        (1.0, 8.0, 4.0, True),
        (0.5, 7.0, 2.0, False),
    ]
    weights = []
    for step, (success, regulariser, pixels, expected) in enumerate(steps):
        accepted = tracker.update(torch.tensor([success]), torch.tensor([regulariser]), torch.tensor([pixels]),
                                  torch.full((1, 1, 1, 1), float(step)), 0.9, schedule)
        assert accepted.item() == expected, step
        weights.append(tracker.weight.item())
    delta, pixels, success = tracker.result()
    assert delta.item() == 4.0 and pixels.item() == 4.0 and success.item() == 1.0  # step 4's, not step 5's
    # x2 after 2 steps at the threshold (steps 0-1), /4 after 2 below it, never mixing the counts
    assert weights == [1.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    tracker.update(torch.tensor([0.5]), torch.tensor([1.0]), torch.tensor([1.0]), torch.zeros(1, 1, 1, 1), 0.9,
                   schedule)
    assert tracker.weight.item() == 0.5


def test_a_class_that_never_reaches_the_threshold_reports_its_most_successful_trigger() -> None:
    tracker = ReleaseTracker.start(1, (1, 1, 1), 1e-3, torch.device("cpu"))
    for step, success in enumerate([0.2, 0.6, 0.4]):
        tracker.update(torch.tensor([success]), torch.tensor([1.0]), torch.tensor([float(10 + step)]),
                       torch.full((1, 1, 1, 1), float(step)), 0.9, Schedule())
    delta, pixels, success = tracker.result()
    assert not tracker.reached.item() and delta.item() == 1.0 and pixels.item() == 11.0
    assert success.item() == pytest.approx(0.6)


def test_the_variables_start_from_seeded_uniform_noise() -> None:
    engine = ReleasedPixelEngine(PixelTrigger(form="clip"), seed=3)
    positive, negative = engine.start([0, 1], (1, 8, 8))
    again, _ = ReleasedPixelEngine(PixelTrigger(form="clip"), seed=3).start([0, 1], (1, 8, 8))
    other, _ = ReleasedPixelEngine(PixelTrigger(form="clip"), seed=4).start([0, 1], (1, 8, 8))
    assert positive.shape == (2, 1, 8, 8) and torch.equal(positive, again) and not torch.equal(positive, other)
    for draw in (positive, negative):
        assert 0.0 <= draw.min() and draw.max() < 1.0 and abs(draw.mean().item() - 0.5) < 0.1
    assert not torch.equal(positive[0], positive[1]) and not torch.equal(positive, negative)


def test_it_runs_exactly_steps_steps_of_one_forward_for_all_classes() -> None:
    model, x, y = backdoored()
    counting = Counting(model)
    result = ReleasedPixelEngine(PixelTrigger(form="clip"), steps=7).run(counting, x, y, range(4))
    assert counting.calls == 7 and result.epochs.tolist() == [7] * 4


def test_a_step_is_scored_on_the_trigger_it_started_from_cut_below_one_level() -> None:
    """Every trigger reaches the threshold, so the first step's is the best: the start, changes below 1/255
    cut (the release measures before the step moves the variables)."""
    x, y = torch.rand(8, 1, 4, 4), torch.zeros(8, dtype=torch.long)
    engine = ReleasedPixelEngine(PixelTrigger(form="clip"), steps=1, seed=1)
    result = engine.run(AlwaysTarget(), x, y, [1])
    positive, negative = engine.start([1], (1, 4, 4))
    net = positive.where(positive >= LEVEL, 0) - negative.where(negative >= LEVEL, 0)
    expected = net.where(net.abs() >= LEVEL, 0)
    assert result.reached.item() and torch.allclose(result.trigger.delta, expected)
    assert result.size.item() == count_pixels(result.trigger).item()


def test_the_released_schedule_recovers_the_one_pixel_backdoor_with_no_change_below_a_level() -> None:
    model, x, y = backdoored()
    result = ReleasedPixelEngine(PixelTrigger(form="clip"), steps=100).run(model, x, y, range(4))
    assert result.reached.all() and result.size[0] == 1 and result.trigger.delta[0, 0, 7, 7] > 0.5
    assert result.size[1:].min() >= 4 and flagged_classes(result.size) == [0]
    delta = result.trigger.delta
    assert ((delta == 0) | (delta.abs() >= LEVEL - 1e-6)).all() and (delta != 0).any()
    assert torch.equal(result.size, count_pixels(result.trigger))
    first, again = (ReleasedPixelEngine(PixelTrigger(form="clip"), steps=10).run(model, x, y, range(4))
                    for _ in range(2))
    assert torch.equal(first.trigger.delta, again.trigger.delta)  # seeded: the same noise and mini-batches


# ----------------------------------------------------------------------------- the inspectors


def test_pixel_keeps_its_cache_key_and_the_released_schedule_has_its_own() -> None:
    before = {"epochs": 100, "batch_size": 32, "lr": 0.1, "threshold": 0.9,
              "schedule": [0.001, 1.5, 1.5 ** 1.5, 5, 25], "mode": "batched", "method": "pixel", "gamma": 10.0,
              "form": "tanh"}
    assert Pixel().settings() == before and Pixel().optimisation_images == 300
    released = Pixel(schedule="released")
    assert isinstance(released.engine, ReleasedPixelEngine) and not isinstance(released.engine, InversionEngine)
    assert released.engine.stackable is False and released.optimisation_images == 50
    assert released.settings() == {"schedule": "released", "steps": 1000, "batch_size": 32, "lr": 0.1,
                                   "threshold": 0.9, "alpha": [0.001, 1.5, 1.5 ** 1.5, 10], "method": "pixel",
                                   "gamma": 10.0, "form": "clip"}
    assert released.engine.method.form == "clip" and released.engine.schedule.patience == 10
    given = Pixel(schedule="released", form="tanh", patience=4, optimisation_images=80, steps=20)
    assert given.settings()["steps"] == 20 and given.settings()["alpha"][3] == 4 and given.form == "tanh"
    assert given.optimisation_images == 80 and Pixel(patience=4).settings()["schedule"][3] == 4


def test_k_arm_keeps_its_cache_key_and_pixel_optimisation_has_its_own() -> None:
    assert KArm().settings() == {"epochs": 100, "batch_size": 32, "lr": 0.1, "threshold": 0.99,
                                 "schedule": [0.001, 1.5, 1.5 ** 1.5, 5, 25], "mode": "batched", "method": "k_arm",
                                 "screen_epochs": 10, "candidates": 3, "epsilon": 0.3}
    pixel = KArm(optimisation="pixel")
    assert isinstance(pixel.engine.method, PixelTrigger) and pixel.settings()["threshold"] == 0.9
    assert {k: pixel.settings()[k] for k in ("optimisation", "gamma", "form")} == \
        {"optimisation": "pixel", "gamma": 10.0, "form": "tanh"}


def test_k_arm_with_pixel_optimisation_recovers_the_one_pixel_backdoor_and_reports_pixels() -> None:
    model, x, y = backdoored()
    k_arm = KArm(optimisation="pixel", candidates=2, screen_epochs=10, epochs=60, optimisation_images=96)
    tensors = k_arm.score(model, ImageSet(to_uint8(x), y), 4, None)
    trigger_pixels = (tensors["delta"].abs().amax(1) >= LEVEL - 1e-6).flatten(1).sum(1).float()
    assert torch.equal(tensors["score"], trigger_pixels) and torch.equal(tensors["size"], trigger_pixels)
    assert tensors["score"][0] == 1 and tensors["delta"][0, 0, 7, 7] > 0.5 and tensors["mask"].eq(0).all()
    assert flagged_classes(tensors["score"]) == [0]
    assert tensors["epochs"][0] > tensors["epochs"][1:].min()  # the bandit spent more epochs on a candidate


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("overrides, field", [
    (["defense=pixel", "defense.schedule=fast"], "defense.schedule"),
    (["defense=pixel", "defense.schedule=released", "defense.steps=0"], "defense.steps"),
    (["defense=k_arm", "defense.optimisation=tabor"], "defense.optimisation"),
])
def test_bad_fields_are_one_line_exit_2_and_write_nothing(overrides: list[str], field: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["bdlab.run", *TINY_RUN, *overrides, f"cache_dir={tmp_path / 'cache'}",
                                      f"hydra.run.dir={tmp_path / 'run'}", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as stop:
        cli()
    assert_refused(stop.value.code, capsys.readouterr().err, tmp_path / "run", tmp_path / "cache", field,
                   overrides[-1].split("=")[1])


@pytest.mark.parametrize("overrides, field", [
    (["defense.mode=sequential"], "defense.mode"),
    (["defense.restarts=3"], "defense.restarts"),
])
def test_the_released_schedule_refuses_the_engine_only_options(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, "defense=pixel", "defense.schedule=released", *overrides]))
    assert info.value.field == field and "schedule=engine" in str(info.value)
