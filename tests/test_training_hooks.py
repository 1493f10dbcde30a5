"""The training seam: every hook of the victim module and the co-optimisation module, on a tiny model."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import Tensor, nn

from bdlab.attacks.base import PoisonedSet
from bdlab.models.classifier import Classifier
from bdlab.training.fit import fit, training_batches
from bdlab.training.hooks import Auxiliary, Batch, TrainingHooks
from bdlab.training.recipe import TrainingRecipe
from bdlab.training.victim import CoOptimisationModule, VictimModule


def recipe(epochs: int = 2, lr: float = 0.1) -> TrainingRecipe:
    trainer = {"accelerator": "cpu", "devices": 1, "max_epochs": epochs, "enable_progress_bar": False,
               "precision": "32-true"}
    return TrainingRecipe(0, 8, epochs, partial(torch.optim.SGD, lr=lr), None, trainer)


def tiny_model() -> Classifier:
    torch.manual_seed(0)
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), (0.0,), (1.0,))


def tiny_set(flagged: int = 8) -> PoisonedSet:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 100, (32, 1, 4, 4), dtype=torch.uint8, generator=generator)
    labels = torch.arange(32) % 2
    flags = torch.zeros(32, dtype=torch.bool)
    flags[:flagged] = True
    return PoisonedSet(images, labels, flags)


def train(hooks: TrainingHooks, module_class=VictimModule, epochs: int = 2, augment=None,
          train_set: PoisonedSet | None = None) -> Classifier:
    model = tiny_model()
    data = train_set or tiny_set()
    module = module_class(model, training_batches(data, recipe(epochs), 0), recipe(epochs), augment, hooks, "t")
    model.train()
    fit(module, recipe(epochs), 0)
    return model.eval()


class Recording(TrainingHooks):
    """Records what each hook sees; stamps flagged images white and relabels them 1."""

    feature_layers = ("0", "penultimate")

    def __init__(self) -> None:
        self.flags_seen: list[Tensor] = []
        self.order: list[str] = []
        self.transformed: list[Tensor] = []
        self.models_seen: list[nn.Module] = []
        self.layers_seen: list[set[str]] = []
        self.epochs_ended = 0

    def poison_batch(self, x, labels, is_poison):
        self.order.append("poison")
        self.flags_seen.append(is_poison.clone())
        x, labels = x.clone(), labels.clone()
        x[is_poison] = 1.0
        labels[is_poison] = 1
        return x, labels

    def train_transform(self, x):
        self.order.append("transform")
        self.transformed.append(x.detach().clone())
        return x

    def after_augment(self, module, x, labels, is_poison):
        self.order.append("after_augment")
        self.models_seen.append(module.model)
        return x, labels

    def extra_loss(self, batch: Batch):
        self.layers_seen.append(set(batch.outputs))
        return {}

    def on_train_epoch_end(self, module):
        self.epochs_ended += 1


def test_hooks_see_the_poison_flags_in_order_and_every_epoch_ends_once() -> None:
    hooks = Recording()
    augmented = []

    def augment(x: Tensor) -> Tensor:
        hooks.order.append("augment")
        augmented.append(x.detach().clone())
        return x

    model = train(hooks, augment=augment)
    assert hooks.order[:4] == ["poison", "augment", "transform", "after_augment"]
    assert all(seen is model for seen in hooks.models_seen)
    assert int(torch.cat(hooks.flags_seen).sum()) == 2 * 8  # 8 flagged samples, seen once per epoch
    # the per-batch poisoning reached the images the augmentation and the model saw
    stamped = torch.cat(augmented)[torch.cat(hooks.flags_seen)]
    assert torch.equal(stamped, torch.ones_like(stamped))
    assert hooks.layers_seen[0] == {"0", "penultimate", "logits"}
    assert hooks.epochs_ended == 2


class RelabelAll(TrainingHooks):
    """After augmentation, every image of the batch is trained on as class 1 (and flipped); records the flags."""

    def __init__(self) -> None:
        self.flags_seen: list[Tensor] = []

    def after_augment(self, module, x, labels, is_poison):
        self.flags_seen.append(is_poison.clone())
        return x.flip(-1), torch.ones_like(labels)


def test_after_augment_changes_the_batch_the_model_steps_on() -> None:
    hooks = RelabelAll()
    relabelled, plain = train(hooks, epochs=3), train(TrainingHooks(), epochs=3)
    assert int(torch.cat(hooks.flags_seen).sum()) == 3 * 8
    x = torch.rand(64, 1, 4, 4)
    assert (relabelled(x).argmax(1) == 1).all() and not (plain(x).argmax(1) == 1).all()


class PushClassOne(TrainingHooks):
    """An extra loss term that rewards the logit of class 1 on every input."""

    def extra_loss(self, batch: Batch):
        return {"push": -batch.outputs["logits"][:, 1].mean()}


def test_extra_loss_terms_change_what_the_model_learns() -> None:
    plain = train(TrainingHooks(), epochs=3)
    pushed = train(PushClassOne(), epochs=3)
    x = torch.rand(64, 1, 4, 4)

    def margin(model: Classifier) -> float:  # how much more class 1 than class 0 the model says
        logits = model(x)
        return (logits[:, 1] - logits[:, 0]).mean().item()

    assert margin(pushed) > margin(plain) + 1.0


class TargetTensor(Auxiliary):
    """A tensor with its own optimiser that learns to make the model predict class 1 on it."""

    steps = 2

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Parameter(torch.full((1, 1, 4, 4), 0.5))
        self.projections = 0

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.image], lr=0.5)

    def auxiliary_loss(self, model: Classifier, batch: Batch) -> Tensor:
        return nn.functional.cross_entropy(model(self.image), torch.tensor([1]))

    def project(self) -> None:
        self.projections += 1
        with torch.no_grad():
            self.image.clamp_(0.0, 1.0)


class WithAuxiliary(TrainingHooks):
    def __init__(self) -> None:
        self.part = TargetTensor()

    def auxiliaries(self):
        return [self.part]


def test_auxiliaries_take_their_own_steps_and_leave_the_model_to_its_optimizer() -> None:
    hooks = WithAuxiliary()
    start = hooks.part.image.detach().clone()
    model = train(hooks, CoOptimisationModule, epochs=2)
    moved = hooks.part.image.detach()
    assert not torch.equal(moved, start) and moved.min() >= 0 and moved.max() <= 1
    assert hooks.part.projections == 2 * 4 * 2  # steps x batches x epochs
    assert model(moved).argmax(1).item() == 1
    # the model's own training is the victim module's: same data, same seed, same weights
    plain = train(TrainingHooks(), epochs=2)
    assert all(torch.allclose(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


def test_co_optimisation_needs_an_auxiliary() -> None:
    with pytest.raises(ValueError, match="auxiliary"):
        CoOptimisationModule(tiny_model(), training_batches(tiny_set(), recipe(), 0), recipe(), None, TrainingHooks())
