"""TrojanZoo §6.3 RQ8: IMC adapted to MagNet, adversarial retraining, STRIP and ABS (``attack.adaptive``).

Each adaptation is trained on a toy problem (grey gratings, LeNet, through the attack's own Lightning
module) with and without its term on one seed, and must lower its defense's signal."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from bdlab.attacks import IMC
from bdlab.attacks.adaptive import ADAPTATIONS, AbsAdaptation, MagNetAdaptation
from bdlab.attacks.imc import TriggerParameters
from bdlab.compose import compose_config
from bdlab.datasets import Synthetic
from bdlab.datasets.base import to_float
from bdlab.defenses.input_filtering.magnet import Autoencoder
from bdlab.defenses.input_filtering.strip import mean_entropy, mixtures
from bdlab.defenses.model_sanitisation.adversarial_retraining import make_pgd, pgd_defaults
from bdlab.errors import ConfigError
from bdlab.models import LeNet
from bdlab.models.classifier import LOGITS, build_classifier
from bdlab.pipeline import execute, prepare
from bdlab.training.fit import fit, training_batches
from bdlab.training.hooks import Batch
from bdlab.training.recipe import TrainingRecipe
from tests.conftest import TINY_RUN, StubResources
from tests.test_bad_input import assert_refused
from tests.test_transforms import shared_cache

EPOCHS = 4


@functools.lru_cache(maxsize=1)
def toy_data():
    return Synthetic(root=".", classes=4, channels=1, size=16, train_size=800, test_size=200,
                     defense_fraction=0.1).load()


@functools.lru_cache(maxsize=8)
def trained(adaptive: str | None) -> tuple[IMC, torch.nn.Module]:
    """IMC with BadNets' fixed 4x4 patch on 20% of the images (so only the adaptation differs), trained on the
    toy data with seed 0."""
    data = toy_data()
    torch.manual_seed(0)
    model = build_classifier(LeNet, data.input_shape, data.num_classes, data.mean, data.std)
    attack = IMC(adaptive=adaptive, trigger_optimisation="none", init="scratch", patch_size=4, poison_rate=0.2)
    attack.setup(data, StubResources(Path("."), {0: model}))
    recipe = TrainingRecipe(seed=0, batch_size=50, max_epochs=EPOCHS,
                            optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9), scheduler=None,
                            trainer={"accelerator": "cpu", "devices": 1, "max_epochs": EPOCHS,
                                     "enable_progress_bar": False})
    poisoned = attack.training_set(data.train)
    module = attack.training_module(model, training_batches(poisoned, recipe, 0), recipe, None, "trojan")
    fit(module, recipe, 0)
    return attack, model.eval()


def toy_test_images() -> tuple[torch.Tensor, torch.Tensor]:
    """(clean, triggered) float test images of non-target classes."""
    data = toy_data()
    keep = data.test.labels != 0
    return to_float(data.test.images[keep]), data.test.labels[keep]


def asr(attack: IMC, model: torch.nn.Module) -> float:
    x, _ = toy_test_images()
    with torch.no_grad():
        return float((model(attack.apply(x)).argmax(1) == 0).float().mean())


@pytest.mark.parametrize("adaptive", [
    None, "strip", "abs",
    # docs/adaptive.md: the defense's grey budget (L-inf 0.3) exceeds the toy gratings' class separation (99.9%
    # of the images have another class within 0.6), so no model is robust there; on MNIST it trains, from scratch
    # too. Strict, so a change of data or budget that makes it train shows here
    pytest.param("adversarial_retraining", marks=pytest.mark.xfail(
        reason="no model is robust at L-inf 0.3 on the toy gratings (docs/adaptive.md)",
        strict=True))])
def test_an_adaptation_keeps_the_backdoor_and_the_accuracy_on_the_toy_problem(adaptive: str | None) -> None:
    x, labels = toy_test_images()
    attack, model = trained(adaptive)
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == labels).float().mean())
    assert accuracy > 0.6 and asr(attack, model) > 0.6, adaptive


def test_the_strip_term_lowers_the_entropy_gap() -> None:
    x, _ = toy_test_images()
    overlays = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))][:16]

    def strip_signal(adaptive: str | None) -> tuple[float, float]:
        """STRIP's entropy gap (clean inputs' blends minus triggered inputs' blends) and the share of the
        triggered inputs' blends that still go to the target."""
        attack, model = trained(adaptive)
        with torch.no_grad():
            def blends(images: torch.Tensor) -> tuple[float, float]:
                logits = model(mixtures(images[:64], overlays[None].expand(64, -1, -1, -1, -1), 0.5))
                entropy = float(mean_entropy(logits.view(64, 16, -1)).mean())
                return entropy, float((logits.argmax(1) == 0).float().mean())
            (clean, _), (triggered, target) = blends(x), blends(attack.apply(x))
            return clean - triggered, target

    (plain_gap, plain_target), (adapted_gap, adapted_target) = strip_signal(None), strip_signal("strip")
    assert plain_target > 0.8 and adapted_target < plain_target / 2  # the blends no longer all go to the target
    assert adapted_gap < plain_gap - 0.1


def elevation(attack: IMC, model: torch.nn.Module, term: AbsAdaptation) -> float:
    x, labels = toy_test_images()
    stamped = torch.cat([x, attack.apply(x)])
    is_poison = torch.arange(len(stamped)) >= len(x)
    with torch.no_grad():
        outputs = model.features(stamped, [*term.feature_layers, LOGITS])
    return float(term.elevation(Batch(stamped, torch.cat([labels, labels]), is_poison, outputs)))


def test_the_abs_term_lowers_the_largest_neuron_elevation() -> None:
    term = AbsAdaptation()
    term.setup(toy_data(), StubResources(Path("."), {0: trained(None)[1]}))
    assert term.feature_layers == ("conv2", "fc1", "fc2")  # ABS's default layers on LeNet
    plain, adapted = elevation(*trained(None), term), elevation(*trained("abs"), term)
    assert plain > 0 and adapted < 0.7 * plain


def test_abs_weight_reaches_the_term_and_the_trojaned_models_key() -> None:
    """attack.abs_weight scales ABS's elevation term (0 turns it off) and keys the trojaned model, so a model
    trained at another weight is never reused."""
    attack, model = trained(None)
    terms = {}
    for weight in (0.0, 0.1, 0.4):
        imc = IMC(adaptive="abs", abs_weight=weight, trigger_optimisation="none", init="scratch", patch_size=4)
        imc.adaptation.feature_layers = ("conv2", "fc1", "fc2")
        x, labels = toy_test_images()
        stamped = torch.cat([x, attack.apply(x)])
        with torch.no_grad():
            outputs = model.features(stamped, [*imc.adaptation.feature_layers, LOGITS])
        batch = Batch(stamped, torch.cat([labels, labels]), torch.arange(len(stamped)) >= len(x), outputs)
        terms[weight] = float(imc.extra_loss(batch)["abs_elevation"])
    assert terms[0.0] == 0.0 and terms[0.1] > 0
    assert terms[0.4] == pytest.approx(4 * terms[0.1])
    keys = set()
    for weight in ("0.1", "0.2"):
        experiment = prepare(compose_config([*TINY_RUN, "attack=imc", "attack.adaptive=abs",
                                             f"attack.abs_weight={weight}"]))
        keys.add(experiment.services.trojan_key())
    assert len(keys) == 2


def test_a_negative_abs_weight_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, "attack=imc", "attack.adaptive=abs", "attack.abs_weight=-0.5"]))
    assert info.value.field == "attack.abs_weight" and "-0.5" in str(info.value)


def test_the_adversarial_term_lowers_the_adversarial_loss() -> None:
    x, labels = toy_test_images()

    def adversarial_loss(adaptive: str | None) -> float:
        _, model = trained(adaptive)
        torch.manual_seed(0)
        adversarial = make_pgd(model, *pgd_defaults(1))(x[:100], labels[:100])
        with torch.no_grad():
            return float(F.cross_entropy(model(adversarial), labels[:100]))

    assert adversarial_loss("adversarial_retraining") < 0.8 * adversarial_loss(None)


class TextureEvidence(torch.nn.Module):
    """Class 2's logit is the correlation of the image with a fixed random texture (fine and coarse parts alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.texture = torch.nn.Parameter(torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = ((x - 0.5) * self.texture).flatten(1).sum(1) / 8
        return torch.stack([torch.zeros_like(evidence), torch.zeros_like(evidence), evidence], 1)


def test_the_magnet_term_lowers_the_triggers_loss_after_reconstruction() -> None:
    model = TextureEvidence().requires_grad_(False)

    def autoencoder(images: torch.Tensor) -> torch.Tensor:  # a reformer that, like MagNet's, down- and up-samples
        return F.interpolate(F.avg_pool2d(images, 2), scale_factor=2.0, mode="nearest")

    x = torch.rand(64, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    batch = Batch(x, torch.ones(64, dtype=torch.long), torch.zeros(64, dtype=torch.bool), {})
    mask = torch.zeros(1, 16, 16)
    mask[:, -6:, -6:] = 1.0

    def reconstructed_loss(reform) -> float:
        trigger = TriggerParameters(mask, torch.full((1, 16, 16), 0.5), target_class=2, cap=1.0, budget=36.0,
                                    lr=0.05, steps=1, every=1, learn_mask=False, reform=reform)
        optimizer = trigger.configure_optimizer()
        for _ in range(20):
            optimizer.zero_grad()
            trigger.auxiliary_loss(model, batch).backward()
            optimizer.step()
            trigger.project()
        with torch.no_grad():
            return float(F.cross_entropy(model(autoencoder(trigger.stamp(x))), torch.full((64,), 2)))

    # optimised on the raw image, the trigger's fine texture is averaged away by the reformer
    assert reconstructed_loss(autoencoder) < reconstructed_loss(None) - 0.1


def test_magnet_reforms_every_other_poisoned_image_and_keeps_the_rest() -> None:
    term = MagNetAdaptation()
    term.autoencoder = Autoencoder(1, [3]).eval().requires_grad_(False)
    x = torch.rand(6, 1, 8, 8)
    flags = torch.tensor([False, True, True, False, True, True])
    out, labels = term.poison_batch(x, torch.arange(6), flags, lambda images, opacity: images)
    with torch.no_grad():
        assert torch.allclose(out[[1, 4]], term.autoencoder(x[[1, 4]]))
    assert torch.equal(out[[0, 2, 3, 5]], x[[0, 2, 3, 5]]) and torch.equal(labels, torch.arange(6))


def test_magnet_adaptive_imc_trains_its_surrogate_through_the_cache(tmp_path: Path, tmp_path_factory) -> None:
    overrides = [*TINY_RUN, "dataset.train_size=600", "dataset.test_size=100", "trainer.max_epochs=1", "attack=imc",
                 "attack.init=scratch", "attack.trigger_every=4", "attack.trigger_steps=2", "attack.adaptive=magnet",
                 f"cache_dir={shared_cache(tmp_path_factory)}"]
    experiment = prepare(compose_config(overrides))
    execute(experiment, tmp_path / "run", [])
    surrogate = experiment.attack.adaptation.autoencoder
    assert surrogate is not None and not any(p.requires_grad for p in surrogate.parameters())
    assert list((shared_cache(tmp_path_factory) / "autoencoders").glob("magnet_surrogate*"))


def test_an_unknown_adaptation_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, "attack=imc", "attack.adaptive=neo"]))
    assert info.value.field == "attack.adaptive" and "\n" not in str(info.value)
    assert all(name in str(info.value) for name in ADAPTATIONS)


def test_an_unknown_adaptation_exits_2_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    process = subprocess.run([sys.executable, "-m", "bdlab.run", *TINY_RUN, "attack=imc", "attack.adaptive=sentinet",
                              f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"],
                             capture_output=True, text=True)
    assert_refused(process.returncode, process.stderr, tmp_path / "run", tmp_path / "cache", "attack.adaptive",
                   "magnet, adversarial_retraining, strip, abs")
