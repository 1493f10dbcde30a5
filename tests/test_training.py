"""In-memory batching, batched augmentation, and the victim module actually learning."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bdlab.compose import compose_config
from bdlab.evaluate import evaluate
from bdlab.pipeline import prepare
from bdlab.training.augment import random_crop
from bdlab.training.fit import fit_classifier
from bdlab.training.loader import BatchedModule, TensorBatches
from bdlab.transforms import random_flip
from tests.conftest import TINY_RUN


def test_batches_cover_each_sample_once_per_epoch_and_are_seeded() -> None:
    images, labels = torch.zeros(103, 1, 2, 2, dtype=torch.uint8), torch.arange(103)
    loader = TensorBatches(images, labels, batch_size=10, seed=4)
    first = torch.cat([y for _, y, _ in loader])
    second = torch.cat([y for _, y, _ in loader])
    assert len(loader) == 11 and sorted(first.tolist()) == list(range(103))
    assert not torch.equal(first, second)
    assert torch.equal(first, torch.cat([y for _, y, _ in TensorBatches(images, labels, 10, seed=4)]))


def test_sharding_is_disjoint() -> None:
    images, labels = torch.zeros(40, 1, 2, 2, dtype=torch.uint8), torch.arange(40)
    shards = [TensorBatches(images, labels, 7, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = [set(torch.cat([y for _, y, _ in s]).tolist()) for s in shards]
    assert len(seen[0]) == len(seen[1]) == 20 and not seen[0] & seen[1]


def test_random_crop_is_a_shifted_window_per_sample() -> None:
    x = torch.arange(2 * 36, dtype=torch.float32).view(2, 1, 6, 6) + 1
    torch.manual_seed(0)
    out = random_crop(x, 2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    offsets = set()
    for seed in range(20):
        torch.manual_seed(seed)
        offsets.add(tuple(random_crop(x, 2)[0].flatten().tolist()))
    assert len(offsets) > 5


def test_hflip_mirrors_some_samples() -> None:
    x = torch.rand(64, 1, 3, 3)
    out = random_flip(x)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_lenet_learns_synthetic_data_to_95_percent() -> None:
    cfg = compose_config([*TINY_RUN, "attack=none", "dataset.channels=3", "dataset.size=32",
                          "dataset.train_size=2000", "trainer.max_epochs=4"])
    experiment = prepare(cfg)
    model = experiment.services.new_model()
    fit_classifier(model, experiment.data.train, experiment.recipe)
    assert evaluate(model, experiment.data.test, None, 0).acc >= 95.0


def test_batched_module_hands_each_rank_its_shard() -> None:
    images, labels = torch.zeros(20, 1, 2, 2, dtype=torch.uint8), torch.arange(20)
    seen = []
    for rank in (0, 1):
        module = BatchedModule(TensorBatches(images, labels, 4, seed=2))
        module._trainer = SimpleNamespace(world_size=2, global_rank=rank)  # what Lightning's strategy sets up
        loader = module.train_dataloader()
        assert loader is module.train_batches and len(loader) == 3
        seen.append(set(torch.cat([y for _, y, _ in loader]).tolist()))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(20))
