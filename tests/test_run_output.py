"""What a run says while it works: one progress line per epoch where the output is not a terminal, what a
defense is doing, a warning when the held-out split cannot resolve the FPR target, and the closing summary
of a plain ``-m`` grid."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from bdlab.attacks.badnets import BadNets
from bdlab.models.classifier import Classifier
from bdlab.training.fit import fit_classifier
from bdlab.training.hooks import TrainingHooks
from bdlab.training.progress import EpochLog
from tests.conftest import TINY_RUN, make_services, make_splits
from tests.sweep_helpers import isolated_env
from tests.test_filtering import BrightnessFilter, PatchModel
from tests.test_training_hooks import recipe, tiny_model, tiny_set

EPOCH_LINE = re.compile(r"epoch (\d+)/3: t/train_loss ([\d.]+), t/train_acc ([\d.]+) \(\d+\.\d s\)")


class EpochLosses(TrainingHooks):
    """Records the loss the module logged at the end of each epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def on_train_epoch_end(self, module: pl.LightningModule) -> None:
        self.losses.append(float(module.trainer.progress_bar_metrics["t/train_loss"]))


def test_output_that_is_not_a_terminal_gets_one_line_per_epoch(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Each epoch's line carries that epoch's own loss, and nothing is drawn with carriage returns."""
    monkeypatch.setattr("bdlab.training.recipe.is_terminal", lambda: False)
    caplog.set_level(logging.INFO, logger="bdlab.training.progress")
    hooks, wanted = EpochLosses(), recipe(3)
    wanted.trainer["enable_progress_bar"] = True  # asked for, but there is no terminal to draw it on
    fit_classifier(tiny_model(), tiny_set(), wanted, hooks=hooks, name="t")
    lines = [EPOCH_LINE.fullmatch(r.getMessage()) for r in caplog.records if r.name == "bdlab.training.progress"]
    assert all(lines) and [int(line[1]) for line in lines] == [1, 2, 3]
    assert [float(line[2]) for line in lines] == pytest.approx(hooks.losses, abs=6e-4)  # shown to 4 digits
    assert "\r" not in capsys.readouterr().out


def test_a_terminal_gets_lightnings_progress_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    wanted = recipe(1)
    monkeypatch.setattr("bdlab.training.recipe.is_terminal", lambda: True)
    assert wanted.make_trainer(enable_progress_bar=True).progress_bar_callback is not None
    assert not any(isinstance(c, EpochLog) for c in wanted.make_trainer(enable_progress_bar=True).callbacks)
    # the bar turned off: the log lines instead
    trainer = wanted.make_trainer(enable_progress_bar=False)
    assert trainer.progress_bar_callback is None and any(isinstance(c, EpochLog) for c in trainer.callbacks)


@pytest.mark.parametrize("fpr, warned", [(0.05, False), (0.01, True)])
def test_a_held_out_split_too_small_for_the_fpr_target_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                       fpr: float, warned: bool) -> None:
    """400 held-out images put 20 above a 5% threshold, enough; a 1% one would rest on 4 of them."""
    caplog.set_level(logging.INFO, logger="bdlab.defenses")
    images = torch.randint(0, 200, (400, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = make_splits(images, torch.ones(400, dtype=torch.long), num_classes=2)
    attack = BadNets(patch_size=1, poison_rate=0.1)
    attack.setup(data)
    model = Classifier(PatchModel(), (0.0,), (1.0,))
    model.anchor = nn.Linear(1, 1)  # a parameter, so the model has a device
    context = make_services(data, attack, model, tmp_path, poisoned_test=attack.poison_test(data.test))
    BrightnessFilter(fpr=fpr).run(context)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ([("brightness: the held-out clean split has 400 images, so the 1% FPR threshold rests on 4 "
                          "of them; the FPR on test inputs may be far from 1%: raise dataset.defense_fraction to hold "
                          "out at least 1000")] if warned else [])
    assert any(r.getMessage().startswith("brightness: scoring ") for r in caplog.records)  # what it is doing


def test_a_plain_multirun_ends_with_the_summary_and_logs_epochs_as_lines(tmp_path: Path) -> None:
    """A ``-m`` grid without a sweep file: the closing summary and report command of ``+sweep=`` grids, and
    (its output a pipe) one line per epoch instead of the progress bar."""
    grid = tmp_path / "grid"
    overrides = [o for o in TINY_RUN if not o.startswith("trainer.enable_progress_bar")]
    done = subprocess.run([sys.executable, "-m", "bdlab.run", "-m", *overrides, "trainer.max_epochs=2", "attack=none",
                           "defense=none", f"hydra.sweep.dir={grid}"], cwd=tmp_path, capture_output=True, text=True,
                          env=isolated_env(tmp_path, tmp_path / "cache"), timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert f"sweep {grid}: cells 1 ok;" in done.stdout and f"report: python -m bdlab.report {grid}" in done.stdout
    assert re.search(r"epoch 1/2: clean/train_loss [\d.]+, clean/train_acc [\d.]+ \(", output)
    assert "epoch 2/2: " in output and "\r" not in output
