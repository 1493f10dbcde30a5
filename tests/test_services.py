"""The run-services object from Python: one attack and one defense without Hydra, the cache helper
and helper-network training under a forked random generator."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bdlab.attacks.badnets import BadNets
from bdlab.cache import ArtifactCache, content_digest
from bdlab.datasets.synthetic import Synthetic
from bdlab.defenses.input_filtering.strip import STRIP
from bdlab.evaluate import evaluate
from bdlab.models.lenet import LeNet
from bdlab.services import RunServices
from bdlab.training.recipe import TrainingRecipe


def python_services(tmp_path: Path, attack: BadNets) -> RunServices:
    data = Synthetic(channels=1, size=16, train_size=2000, test_size=300).load()
    recipe = TrainingRecipe(seed=0, batch_size=64, max_epochs=5,
                            optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9), scheduler=None,
                            trainer={"max_epochs": 5, "accelerator": "cpu", "enable_progress_bar": False})
    return RunServices(None, data, recipe, attack, ArtifactCache(tmp_path / "cache"), torch.device("cpu"), tmp_path,
                       network=LeNet)


def test_one_attack_and_one_defense_run_from_python_without_hydra(tmp_path: Path) -> None:
    attack = BadNets(patch_size=3, poison_rate=0.1)
    services = python_services(tmp_path, attack)
    attack.setup(services.data, services)
    trojan = services.train_trojan()
    services.use_models(trojan=trojan)
    assert services.trojan_model() is trojan and services.trojan_key() == content_digest(*trojan.state_dict().values())
    services.poisoned_test = attack.poison_test(services.data.test)
    services.undefended = evaluate(trojan, services.data.test, services.poisoned_test, attack.target_class)
    assert services.undefended.asr > 80  # the backdoor was learnt through the attack's own training module
    assert torch.equal(services.poisoned_test.sources, attack.test_sources(services.data.test))
    metrics = STRIP(num_overlays=8).run(services)
    assert metrics["defense/roc_auc"] > 0.5 and 0 <= metrics["defense/tpr"] <= 100


def test_cached_returns_the_build_seconds_and_builds_once(tmp_path: Path) -> None:
    services = python_services(tmp_path, BadNets())
    calls: list[int] = []

    def build() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"x": torch.arange(3)}

    first, seconds = services.cached("kind", {"a": 1}, build)
    again, seconds_again = services.cached("kind", {"a": 1}, build)
    assert calls == [1] and torch.equal(first["x"], again["x"]) and set(again) == {"x"}
    assert seconds == seconds_again and seconds >= 0 and not math.isnan(seconds)
    services.cached("kind", {"a": 2}, build)
    assert len(calls) == 2


def test_content_digest_follows_content_not_identity() -> None:
    a = torch.arange(6, dtype=torch.uint8)
    assert content_digest(a) == content_digest(a.clone())
    assert content_digest(a) != content_digest(a.view(2, 3))  # the shape is part of the content
    assert content_digest(a) != content_digest(a.to(torch.int64))
    assert content_digest(a, {"k": 1}) != content_digest(a, {"k": 2})


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)

    def training_step(self, batch, _):
        return self.layer(batch[0]).pow(2).mean()

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(12, 2)), batch_size=4)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_helper_leaves_the_global_random_state_as_it_was(tmp_path: Path) -> None:
    services = python_services(tmp_path, BadNets())
    first, second = Tiny(), Tiny()
    second.load_state_dict(first.state_dict())
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    services.fit_helper(first, seed=5, max_epochs=1)
    assert torch.equal(torch.rand(3), expected)
    services.fit_helper(second, seed=5, max_epochs=1)  # the helper's own seed makes its training reproducible
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
