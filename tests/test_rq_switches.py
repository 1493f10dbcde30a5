"""TrojanZoo §6's attack switches (docs/explorations.md): random-shaped triggers (RQ2), the start of the
trojaned model's training (RQ4) and how poisoned inputs are mixed in (RQ6); their cache keys and bad input."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from bdlab.attacks import BadNets
from bdlab.attacks.base import Attack
from bdlab.compose import compose_config
from bdlab.errors import ConfigError
from bdlab.models.classifier import LOGITS
from bdlab.run import cli
from bdlab.services import create, model_spec
from bdlab.training.fit import training_batches
from bdlab.training.hooks import Batch
from bdlab.training.loader import TensorBatches
from bdlab.training.victim import VictimModule
from tests.conftest import TINY_RUN, StubResources, make_splits
from tests.test_bad_input import assert_refused

SIZE = 16


def indexed_splits(count: int = 60) -> object:
    """16x16 grey images whose every pixel holds the image's index (so a stamped copy still names its
    source away from the trigger), labels cycling over 10 classes."""
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 1, SIZE, SIZE).clone()
    return make_splits(images, torch.arange(count) % 10)


def set_up(attack: Attack, resources: object = None) -> Attack:
    attack.setup(indexed_splits(), resources)
    return attack


# ---- RQ2: random-shaped triggers
def test_a_random_shape_keeps_exactly_the_patch_pixels_scattered_by_the_seed() -> None:
    square = set_up(BadNets(patch_size=3, seed=0)).trigger_mask
    random = set_up(BadNets(patch_size=3, seed=0, trigger_shape="random")).trigger_mask
    assert int(square.sum()) == int(random.sum()) == 9
    rows, cols = random.nonzero().unbind(1)
    assert int(rows.max() - rows.min()) > 2 or int(cols.max() - cols.min()) > 2  # not a 3x3 square
    assert torch.equal(random, set_up(BadNets(patch_size=3, seed=0, trigger_shape="random")).trigger_mask)
    assert not torch.equal(random, set_up(BadNets(patch_size=3, seed=1, trigger_shape="random")).trigger_mask)
    # [height, width] gives height x width pixels; stamping writes the patch's value there and nowhere else
    wide = set_up(BadNets(patch_size=[2, 5], seed=0, trigger_shape="random", color=200))
    stamped = wide.apply(torch.zeros(2, 1, SIZE, SIZE))
    assert int(wide.trigger_mask.sum()) == 10
    assert torch.equal(stamped[0, 0] != 0, wide.trigger_mask) and torch.allclose(stamped[stamped != 0],
                                                                                 torch.tensor(200 / 255))


def test_a_random_shape_with_more_pixels_than_the_image_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        set_up(BadNets(patch_size=[SIZE, SIZE + 1], trigger_shape="random"))
    assert info.value.field == "attack.patch_size" and "272 pixels" in str(info.value)
    assert int(set_up(BadNets(patch_size=SIZE, trigger_shape="random")).trigger_mask.sum()) == SIZE * SIZE


# ---- RQ6: batch- and loss-level mixing
def test_batch_level_mixing_puts_each_poisoned_copy_in_the_batch_of_its_clean_version() -> None:
    data = indexed_splits()
    attack = set_up(BadNets(poison_rate=0.2, mixing="batch"))
    train_set = attack.training_set(data.train)
    poisoned = attack.poison_indices(data.train.labels)
    assert len(train_set) == len(data.train) + len(poisoned) and torch.equal(train_set.pairs, poisoned)
    assert not train_set.is_poison[:len(data.train)].any() and train_set.is_poison[len(data.train):].all()
    assert torch.equal(train_set.images[:len(data.train)], data.train.images)  # every clean image kept
    assert (train_set.labels[len(data.train):] == attack.target_class).all()
    assert not torch.equal(train_set.images[len(data.train):], data.train.images[poisoned])  # stamped
    recipe = type("Recipe", (), {"batch_size": 8})()
    batches = training_batches(train_set, recipe, seed=3)
    seen, copies = [], 0
    for images, _, flags in batches:
        sources = images[:, 0, 0, 0]  # the top-left pixel, away from the patch, names the source image
        assert set(sources[flags].tolist()) <= set(sources[~flags].tolist())
        assert int((~flags).sum()) <= 8
        seen += sources[~flags].tolist()
        copies += int(flags.sum())
    assert sorted(seen) == list(range(len(data.train))) and copies == len(poisoned)
    assert len(list(iter(batches))) == len(batches) == math.ceil(len(data.train) / 8)


def test_the_loader_without_pairs_batches_as_before() -> None:
    images, labels = torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10)
    plain = [batch[1].tolist() for batch in TensorBatches(images, labels, 4, seed=5)]
    order = torch.randperm(10, generator=torch.Generator().manual_seed(5)).tolist()
    assert plain == [order[:4], order[4:8], order[8:]]


def hand_batch() -> Batch:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, -2.0, 0.5], [-1.0, 2.0, 0.0]])
    labels = torch.tensor([0, 2, 2, 1, 0])
    is_poison = torch.tensor([False, False, True, True, False])
    return Batch(torch.zeros(5, 1, 2, 2), labels, is_poison, {LOGITS: logits})


def by_hand(batch: Batch) -> list[float]:
    logits, labels = batch.outputs[LOGITS].tolist(), batch.labels.tolist()
    return [math.log(sum(math.exp(v) for v in row)) - row[label] for row, label in zip(logits, labels)]


@pytest.mark.parametrize("weight", [0.25, 0.0])
def test_the_loss_level_weight_reaches_the_model_step(weight: float) -> None:
    batch = hand_batch()
    ce = by_hand(batch)
    clean = (ce[0] + ce[1] + ce[4]) / 3
    poison = (ce[2] + ce[3]) / 2
    attack = BadNets(mixing="loss", mixing_weight=weight)
    module = VictimModule(torch.nn.Linear(1, 1), TensorBatches(torch.zeros(1, 1, 1, 1, dtype=torch.uint8),
                                                               torch.zeros(1, dtype=torch.long), 1), None,
                          hooks=attack)
    module.on_train_epoch_start()
    assert module.model_loss(batch).item() == pytest.approx(clean + weight * poison, rel=1e-6)
    # the other mixings train on the plain mean over the batch
    module.hooks = BadNets(mixing="batch", mixing_weight=weight)
    assert module.model_loss(batch).item() == pytest.approx(sum(ce) / 5, rel=1e-6)
    assert F.cross_entropy(batch.outputs[LOGITS], batch.labels).item() == pytest.approx(sum(ce) / 5, rel=1e-6)


# ---- RQ4: the start of training
def test_init_clean_starts_from_the_clean_reference_and_scratch_from_fresh_weights() -> None:
    torch.manual_seed(0)
    clean, fresh = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    resources = StubResources(Path("unused"), {0: clean})
    start = set_up(BadNets(init="clean"), resources).initial_model(torch.nn.Linear(4, 3))
    assert all(torch.equal(a, b) for a, b in zip(start.state_dict().values(), clean.state_dict().values()))
    kept = set_up(BadNets(), resources).initial_model(fresh)
    assert kept is fresh and resources.asked == [0]  # scratch never asks for the clean model


# ---- every switch on a tiny model, and the cache keys
TINY = [*TINY_RUN, "dataset.train_size=200", "dataset.test_size=50", "trainer.max_epochs=1"]


def test_each_switch_trains_a_tiny_model_under_its_own_cache_key(tmp_path: Path) -> None:
    keys = {create([*TINY, f"cache_dir={tmp_path}"], tmp_path).trojan_key()}
    for switch in ("attack.trigger_shape=random", "attack.mixing=batch", "attack.mixing=loss", "attack.init=clean"):
        services = create([*TINY, switch, f"cache_dir={tmp_path}"], tmp_path)
        assert services.trojan_key() not in keys, switch
        keys.add(services.trojan_key())
        model = services.trojan_model()
        assert services.artifacts["trojan_model"]["reused"] is False
        assert all(torch.isfinite(value).all() for value in model.state_dict().values())
    # fine-tuned from the clean reference (trained once, in the shared cache), so it moved away from it
    clean = services.clean_model()
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), clean.state_dict().values()))


def test_the_switches_at_their_defaults_leave_the_cache_keys_as_they_were() -> None:
    default = model_spec(compose_config(["attack=badnets"]), with_attack=True)["attack"]
    assert not {"init", "mixing", "mixing_weight", "trigger_shape"} & set(default)
    spelled = model_spec(compose_config(["attack=badnets", "attack.init=scratch", "attack.mixing_weight=0.01"]),
                         with_attack=True)["attack"]
    assert spelled == default
    changed = model_spec(compose_config(["attack=badnets", "attack.mixing=loss", "attack.mixing_weight=0.1"]),
                         with_attack=True)["attack"]
    assert changed == {**default, "mixing": "loss", "mixing_weight": 0.1}
    # trojannn had init (clean) in its config before: it stays in its key
    assert model_spec(compose_config(["attack=trojannn"]), with_attack=True)["attack"]["init"] == "clean"
    assert "init" not in model_spec(compose_config(["attack=trojannet"]), with_attack=True)["attack"]


# ---- bad input: one line naming the field, exit 2, nothing written
BAD = [
    (["attack.trigger_shape=star"], "attack.trigger_shape", "square, random"),
    (["attack.trigger_shape=random", "attack.patch_size=17"], "attack.patch_size", "289 pixels"),
    (["attack=targeted", "+attack.trigger_shape=random"], "attack.trigger_shape", "square patch"),
    (["attack=trojannet", "+attack.trigger_shape=random"], "attack.trigger_shape", "square box"),
    (["attack.mixing=shuffle"], "attack.mixing", "dataset, batch, loss"),
    (["attack.mixing=loss", "attack.mixing_weight=-0.1"], "attack.mixing_weight", ">= 0"),
    (["attack=trojannet", "+attack.mixing=batch"], "attack.mixing", "nothing to mix"),
    (["attack.init=pretrained"], "attack.init", "clean, scratch"),
    (["attack=trojannet", "attack.init=scratch"], "attack.init", "must be one of clean"),
    (["attack=given", "+attack.init=clean"], "attack.init", "no such field"),
]


@pytest.mark.parametrize("overrides, field, words", BAD, ids=[" ".join(case[0]) for case in BAD])
def test_bad_switches_are_one_line_exit_2_and_write_nothing(overrides: list[str], field: str, words: str,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["bdlab.run", *TINY_RUN, *overrides, f"cache_dir={tmp_path / 'cache'}",
                                      f"hydra.run.dir={tmp_path / 'run'}", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as stop:
        cli()
    assert_refused(stop.value.code, capsys.readouterr().err, tmp_path / "run", tmp_path / "cache", field, words)
