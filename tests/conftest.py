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


def make_services(data: DatasetSplits, attack, model: torch.nn.Module, output_dir: Path = Path("."),
                  poisoned_train=None, poisoned_test=None, undefended=None, retrain=None):
    """Run services around a given model (the clean reference and the trojaned model alike), without a
    config: the subject a defense unit test runs on, its cache under ``output_dir``."""
    from bdlab.cache import ArtifactCache
    from bdlab.evaluate import Evaluation
    from bdlab.services import RunServices

    services = RunServices(None, data, attack=attack, cache=ArtifactCache(Path(output_dir) / "cache"),
                           output_dir=output_dir).use_models(clean=model, trojan=model)
    services.poisoned_train, services.poisoned_test = poisoned_train, poisoned_test
    services.undefended = undefended if undefended is not None else Evaluation()
    if retrain is not None:
        services.retrain = retrain
    return services


class StubResources:
    """Attack-side run services (:class:`~bdlab.services.RunServices`) for unit tests: a cache under ``root``,
    the CPU, and the given clean models by training seed (``run_seed``'s is the reference), recording
    which seeds were asked for."""

    def __init__(self, root: Path, models: dict[int, torch.nn.Module] | None = None, key: str = "key",
                 run_seed: int = 0) -> None:
        from bdlab.cache import ArtifactCache

        self.cache, self.device = ArtifactCache(root), torch.device("cpu")
        self.models, self.key, self.run_seed = models or {}, key, run_seed
        self.asked: list[int] = []

    def clean_key(self, seed: int | None = None) -> str:
        return self.key if seed is None or seed == self.run_seed else f"{self.key}-{seed}"

    def clean_model(self, seed: int | None = None) -> torch.nn.Module:
        seed = self.run_seed if seed is None else seed
        self.asked.append(seed)
        return self.models[seed]

    def fresh_model(self) -> torch.nn.Module:
        import copy

        return copy.deepcopy(self.models[self.run_seed])
