"""Shared fixtures: a tiny synthetic dataset and run overrides sized for a 2-core CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bdlab.datasets.base import DatasetSplits, ImageSet

# a run that trains in seconds: 16x16 grey gratings, 2000 training images, LeNet, 5 epochs
TINY_RUN = ["dataset=synthetic", "dataset.channels=1", "dataset.size=16", "dataset.train_size=2000",
            "dataset.test_size=300", "model=lenet", "trainer.max_epochs=5", "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false", "logger=none"]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BDLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BDLAB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_splits(images: torch.Tensor, labels: torch.Tensor, num_classes: int = 10) -> DatasetSplits:
    """Splits whose train, defense and test sets are all the given images (for hand-built checks)."""
    channels = images.shape[1]
    image_set = ImageSet(images, labels)
    return DatasetSplits("handmade", image_set, image_set, image_set, num_classes, (0.5,) * channels,
                         (0.25,) * channels)
