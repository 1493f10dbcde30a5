"""Label-consistent attack: four-corner symmetric trigger, PGD on the (robust or clean) surrogate, clean labels,
cache."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from bdlab.attacks import label_consistent
from bdlab.attacks.label_consistent import (
    FastAdversarialTraining,
    LabelConsistent,
    LogitEnsemble,
    fast_adversarial_training,
    foreground,
    pgd_untargeted,
)
from bdlab.compose import compose_config
from bdlab.datasets.base import ImageSet
from bdlab.errors import ConfigError
from bdlab.evaluate import evaluate
from bdlab.models import LeNet
from bdlab.models.classifier import build_classifier
from bdlab.pipeline import execute, prepare
from bdlab.services import RunServices
from bdlab.training.recipe import TrainingRecipe
from tests.conftest import TINY_RUN, StubResources, make_splits
from tests.test_transforms import shared_cache


def handmade(n: int = 80) -> tuple:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 16, 16), generator=generator, dtype=torch.uint8)
    labels = torch.arange(n) % 4
    return make_splits(images, labels, num_classes=4)


class Services(StubResources):
    """The stub services with the run's helper training (a CPU trainer, no progress bar)."""

    recipe = TrainingRecipe(0, 16, 1, None, None, {"accelerator": "cpu", "devices": 1, "max_epochs": 1,
                                                   "enable_progress_bar": False})
    fit_helper = RunServices.fit_helper


def surrogate():
    torch.manual_seed(0)
    return build_classifier(LeNet, (1, 16, 16), 4, (0.5,), (0.25,))


def test_trigger_is_four_symmetric_corners_blended_at_test_amplitude() -> None:
    attack = LabelConsistent(test_amplitude=0.5)
    attack.setup(handmade())
    x = torch.rand(3, 1, 16, 16)
    stamped = attack.apply(x)
    mask = attack.trigger_mask
    assert mask.sum() == 4 * 9 and mask[0, 0] and mask[15, 15] and mask[0, 15] and mask[15, 0] and not mask[8, 8]
    assert torch.equal(stamped[:, :, ~mask], x[:, :, ~mask])
    assert torch.allclose(stamped[:, :, 0, 0], 0.5 * x[:, :, 0, 0] + 0.5)
    assert torch.allclose(attack.apply(x.flip(-1)), stamped.flip(-1))  # symmetric: Flip leaves it in place
    assert torch.allclose(attack.apply(x.flip(-2)), stamped.flip(-2))


def test_poisons_only_the_target_class_with_bounded_perturbation_and_caches(tmp_path: Path) -> None:
    data = handmade()
    attack = LabelConsistent(poison_rate=0.25, epsilon=8 / 255, step=2 / 255, iterations=5, target_class=1,
                             surrogate="clean")
    attack.setup(data)
    with pytest.raises(RuntimeError):
        attack.poison_train(data.train)
    attack.setup(data, StubResources(tmp_path, {0: surrogate()}))
    poisoned = attack.poison_train(data.train)
    assert torch.equal(poisoned.labels, data.train.labels)  # clean-label
    assert poisoned.is_poison.sum() == 5 and (data.train.labels[poisoned.is_poison] == 1).all()
    changed = (poisoned.images != data.train.images).flatten(1).any(1)
    assert torch.equal(changed, poisoned.is_poison)
    difference = (poisoned.images.float() - data.train.images.float()).abs()[poisoned.is_poison]
    off_trigger = difference[:, :, ~attack.trigger_mask]
    assert off_trigger.max() <= 8 + 1 and off_trigger.max() > 0  # PGD within epsilon (plus rounding)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 1  # the clean surrogate: no robust model trained
    assert not (tmp_path / "models").exists()
    again = attack.poison_train(data.train)
    assert torch.equal(again.images, poisoned.images)


def test_zero_iterations_is_the_trigger_alone(tmp_path: Path) -> None:
    data = handmade()
    attack = LabelConsistent(iterations=0, amplitude=0.25, surrogate="clean")
    attack.setup(data, StubResources(tmp_path, {0: surrogate()}))
    poisoned = attack.poison_train(data.train)
    index = poisoned.is_poison
    x, m = data.train.images[index].float() / 255, 0.25 * attack.trigger_mask.float()
    expected = (x * (1 - m) + m * attack.pattern) * 255
    assert (poisoned.images[index].float() - expected).abs().max() <= 0.5001


def test_robust_surrogate_is_adversarially_trained_once_and_cached(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data = handmade()
    calls: list[int] = []

    def counting(*args, **kwargs):
        calls.append(1)
        return fast_adversarial_training(*args, **kwargs)

    monkeypatch.setattr(label_consistent, "fast_adversarial_training", counting)
    clean = surrogate()
    clean_state = {k: v.clone() for k, v in clean.state_dict().items()}
    settings = dict(epsilon=0.1, step=0.02, iterations=5, target_class=1, adv_epsilon=0.2, adv_epochs=1,
                    adv_batch_size=16)
    attack = LabelConsistent(**settings)
    attack.setup(data, Services(tmp_path, {0: clean}))
    state = torch.get_rng_state()
    poisoned = attack.poison_train(data.train)
    assert calls == [1] and torch.equal(torch.get_rng_state(), state)  # trained under its own generator
    assert len(list((tmp_path / "models" / "robust_surrogate").glob("*/tensors.safetensors"))) == 1
    assert all(torch.equal(v, clean_state[k]) for k, v in clean.state_dict().items())  # the clean model is untouched
    robust, key = attack.robust_surrogate(data.train)
    assert calls == [1] and not torch.equal(robust.state_dict()["net.head.weight"], clean_state["net.head.weight"])
    # another run with the same settings (new poisoned images asked for) reuses the stored surrogate
    other = LabelConsistent(**{**settings, "iterations": 3})
    other.setup(data, Services(tmp_path, {0: surrogate()}))
    other.poison_train(data.train)
    assert calls == [1] and other.robust_surrogate(data.train)[1] == key
    # the clean surrogate gives other perturbations, cached apart from the robust ones
    plain = LabelConsistent(**{**settings, "surrogate": "clean"})
    plain.setup(data, StubResources(tmp_path, {0: clean}))
    assert not torch.equal(plain.poison_train(data.train).images, poisoned.images)
    assert len(list((tmp_path / "poisoned" / "label_consistent").glob("*/tensors.safetensors"))) == 3
    # a different training setting or clean model key is a different surrogate
    changed = LabelConsistent(**{**settings, "adv_epsilon": 0.1})
    changed.setup(data, Services(tmp_path, {0: clean}))
    assert changed.robust_surrogate(data.train)[1] != key and calls == [1, 1]
    scratch = LabelConsistent(**{**settings, "adv_init": "scratch"})
    scratch.setup(data, Services(tmp_path, {0: clean}, key="other-key"))
    assert scratch.robust_surrogate(data.train)[1] not in (key,) and calls == [1, 1, 1]


def test_fast_adversarial_training_makes_the_surrogate_robust() -> None:
    torch.manual_seed(0)
    n = 512
    labels = torch.arange(n) % 2
    # class = brightness of the left half (a gap of 0.4, learnable robustly at epsilon 0.1)
    images = torch.zeros(n, 1, 16, 16)
    images[:, :, :, :8] = (0.3 + 0.4 * labels.float()).view(-1, 1, 1, 1) + 0.05 * torch.randn(n, 1, 16, 8)
    images = (images.clamp(0, 1) * 255).to(torch.uint8)
    model = build_classifier(LeNet, (1, 16, 16), 2, (0.5,), (0.25,))
    untrained = robust_accuracy_of(model, images, labels)
    train = ImageSet(images, labels)
    fast_adversarial_training(model, train, epsilon=0.1, step=0.125, epochs=4, lr=0.05, batch_size=64, seed=0,
                              services=Services(Path(".")))
    assert untrained < 0.7 and robust_accuracy_of(model, images, labels) > 0.9
    assert not model.training
    # the hooks' batches: FGSM examples from a random start, inside the ball, labels kept
    x = images[:64].float() / 255
    adversarial, kept = FastAdversarialTraining(0.1, 0.125).after_augment(SimpleNamespace(model=model), x,
                                                                           labels[:64], labels[:64] < 0)
    assert torch.equal(kept, labels[:64]) and 0.05 < (adversarial - x).abs().max() <= 0.1 + 1e-6


def robust_accuracy_of(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    x = images.float() / 255
    adversarial = pgd_untargeted(model, x, labels, 0.1, 0.025, 10)
    with torch.no_grad():
        return float((model(adversarial).argmax(1) == labels).float().mean())


def test_foreground_mask_is_the_dilated_object() -> None:
    x = torch.zeros(1, 3, 9, 9)
    x[0, 1, 4, 4] = 0.5  # one lit pixel in one channel
    assert foreground(x, 0)[0, 0].nonzero().tolist() == [[4, 4]]
    dilated = foreground(x, 2)[0, 0]
    assert dilated.sum() == 25 and dilated[2:7, 2:7].all()


def test_foreground_pgd_leaves_the_background_untouched() -> None:
    torch.manual_seed(0)
    model = build_classifier(LeNet, (1, 16, 16), 2, (0.5,), (0.25,))
    x = torch.zeros(4, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 1.0
    labels = torch.tensor([0, 1, 0, 1])
    region = foreground(x, 1)
    adversarial = pgd_untargeted(model, x, labels, 0.3, 0.1, 5, region)
    assert torch.equal(adversarial[:, :, region[0, 0] == 0], x[:, :, region[0, 0] == 0])
    assert (adversarial - x).abs().amax() > 0.05 and (adversarial - x).abs().amax() <= 0.3 + 1e-6
    unconfined = pgd_untargeted(model, x, labels, 0.3, 0.1, 5)
    assert (unconfined[:, :, region[0, 0] == 0] != 0).any()  # without the region the background moves


def test_logit_ensemble_is_the_mean_of_its_members_logits() -> None:
    torch.manual_seed(0)
    members = [build_classifier(LeNet, (1, 16, 16), 4, (0.5,), (0.25,)) for _ in range(3)]
    x = torch.rand(5, 1, 16, 16)
    with torch.no_grad():
        expected = sum(member(x) for member in members) / 3
        assert torch.allclose(LogitEnsemble(members)(x), expected, atol=1e-6)
    with pytest.raises(ValueError):
        LogitEnsemble([])


def test_ensemble_surrogate_attacks_the_reference_and_other_seed_models(tmp_path: Path) -> None:
    data = handmade()

    def member(seed: int):
        torch.manual_seed(seed)
        return build_classifier(LeNet, (1, 16, 16), 4, (0.5,), (0.25,))

    settings = dict(epsilon=0.1, step=0.02, iterations=5, target_class=1, surrogate="ensemble", ensemble_size=3,
                    seed=4)
    attack = LabelConsistent(**settings)
    attack.setup(data)
    with pytest.raises(RuntimeError):  # no resources: no way to get the members
        attack.poison_train(data.train)
    resources = StubResources(tmp_path, {4: surrogate(), 5: member(5), 6: member(6)}, run_seed=4)
    attack.setup(data, resources)
    ensemble, keys = attack.ensemble_surrogate(), attack.ensemble_keys()
    assert resources.asked == [4, 5, 6] and keys == ["key", "key-5", "key-6"] and len(ensemble.members) == 3
    poisoned = attack.poison_train(data.train)
    index = poisoned.is_poison
    x = data.train.images[index].float() / 255
    expected = (pgd_untargeted(ensemble, x, data.train.labels[index], 0.1, 0.02, 5) * 255).round() / 255  # cached uint8
    m = 0.25 * attack.trigger_mask.float()
    assert (poisoned.images[index].float() - (expected * (1 - m) + m * attack.pattern) * 255).abs().max() <= 0.5001
    # one model is the clean surrogate: different perturbations, cached apart
    single = LabelConsistent(**{**settings, "ensemble_size": 1})
    single.setup(data, resources)
    assert not torch.equal(single.poison_train(data.train).images, poisoned.images)
    assert len(list((tmp_path / "poisoned" / "label_consistent").glob("*/tensors.safetensors"))) == 2


def test_pipeline_trains_and_caches_the_other_seed_clean_models(tmp_path: Path, tmp_path_factory) -> None:
    cache = shared_cache(tmp_path_factory)
    overrides = [*TINY_RUN, "attack=label_consistent", "attack.poison_rate=0.5", "attack.surrogate=ensemble",
                 "attack.ensemble_size=2", "attack.iterations=3", f"cache_dir={cache}"]
    cfg = compose_config(overrides)
    metrics = execute(prepare(cfg), tmp_path / "run", [])["metrics"]
    assert metrics["trojan/acc"] > 80
    clean_models = set((cache / "models" / "clean").glob("*/tensors.safetensors"))
    assert len(clean_models) >= 2  # the reference and the seed-1 model
    models = prepare(compose_config(overrides)).services
    seed1, key1 = models.clean_model(1), models.clean_key(1)
    seed0, key0 = models.clean_model(0), models.clean_key(0)
    # both come from the cache (nothing new is trained) and are different models
    assert key0 != key1 and set((cache / "models" / "clean").glob("*/tensors.safetensors")) == clean_models
    assert not torch.equal(seed0.state_dict()["net.head.weight"], seed1.state_dict()["net.head.weight"])


def test_end_to_end_on_the_tiny_run(tmp_path: Path, tmp_path_factory) -> None:
    """The run hands over clean-label poisons that the clean model misreads, and tests with the full trigger."""
    cache = shared_cache(tmp_path_factory)  # the clean model is the one the other tiny runs train
    cfg = compose_config([*TINY_RUN, "attack=label_consistent", "attack.poison_rate=0.5", "attack.surrogate=clean",
                          "attack.epsilon=0.1", "attack.step=0.02", f"cache_dir={cache}"])
    experiment = prepare(cfg)
    outcome = execute(experiment, tmp_path / "run", [])
    metrics, poisoned = outcome["metrics"], outcome["poisoned_train"]
    train, attack = experiment.data.train, experiment.attack
    assert metrics["trojan/acc"] > 80 and metrics["attack/cad"] == metrics["clean/acc"] - metrics["trojan/acc"]
    assert 0.0 <= metrics["trojan/asr"] <= 100.0 and metrics["trojan/asr"] >= metrics["clean/asr"] - 1.0
    # clean-label: every label kept, half of the target class (and nothing else) poisoned
    assert torch.equal(poisoned.labels, train.labels)
    assert (train.labels[poisoned.is_poison] == 0).all()
    assert poisoned.is_poison.sum() == round(0.5 * (train.labels == 0).sum().item())
    # the PGD perturbation stays within epsilon off the trigger and misleads the clean surrogate
    index = poisoned.is_poison
    moved = (poisoned.images[index].float() - train.images[index].float()).abs()[:, :, ~attack.trigger_mask]
    assert moved.max() <= 0.1 * 255 + 1 and moved.mean() > 2
    clean_model = experiment.services.clean_model()
    on_originals = evaluate(clean_model, ImageSet(train.images[index], train.labels[index]), None, 0).acc
    on_poisons = evaluate(clean_model, ImageSet(poisoned.images[index], train.labels[index]), None, 0).acc
    assert on_originals > 95 and on_poisons < on_originals - 50
    assert list((cache / "poisoned" / "label_consistent").glob("*/tensors.safetensors"))


@pytest.mark.parametrize("overrides, field", [
    (["attack.amplitude=0"], "attack.amplitude"), (["attack.amplitude=1.5"], "attack.amplitude"),
    (["attack.test_amplitude=2"], "attack.test_amplitude"), (["attack.epsilon=-0.1"], "attack.epsilon"),
    (["attack.step=2"], "attack.step"), (["attack.iterations=-1"], "attack.iterations"),
    (["attack.perturbation_region=background"], "attack.perturbation_region"),
    (["attack.foreground_dilation=-1"], "attack.foreground_dilation"),
    (["attack.poison_rate=0"], "attack.poison_rate"), (["attack.surrogate=robust"], "attack.surrogate"),
    (["attack.ensemble_size=0"], "attack.ensemble_size"),
    (["attack.adv_init=pretrained"], "attack.adv_init"), (["attack.adv_epsilon=0"], "attack.adv_epsilon"),
    (["attack.adv_step=-1"], "attack.adv_step"), (["attack.adv_epochs=0"], "attack.adv_epochs"),
    (["attack.adv_lr=0"], "attack.adv_lr"), (["attack.adv_batch_size=0"], "attack.adv_batch_size"),
])
def test_bad_values_are_refused_before_training(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, "attack=label_consistent", *overrides]))
    assert str(info.value).startswith(field)
