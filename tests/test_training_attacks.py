"""The attacks that change training: Tb, TrojanNN, IMC, latent backdoor, ABE, TrojanNet."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bdlab.attacks import ABE, IMC, LatentBackdoor, Targeted, TrojanNet, TrojanNN
from bdlab.attacks.abe import balanced_bce
from bdlab.attacks.imc import TriggerParameters, project_mask
from bdlab.attacks.latent_backdoor import latent_trigger
from bdlab.attacks.targeted import place_patches
from bdlab.attacks.trojannet import pattern_family
from bdlab.attacks.trojannn import excite_neurons, neuron_activations, neuron_scores
from bdlab.compose import compose_config
from bdlab.errors import ConfigError
from bdlab.models import LeNet
from bdlab.models.classifier import Classifier, build_classifier
from bdlab.pipeline import execute, prepare
from bdlab.training.hooks import Batch
from tests.conftest import TINY_RUN, StubResources, make_splits
from tests.test_transforms import shared_cache


def splits(n: int = 200, size: int = 16, classes: int = 4):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 120, (n, 1, size, size), dtype=torch.uint8, generator=generator)
    return make_splits(images, torch.arange(n) % classes, classes)


def lenet(classes: int = 4, size: int = 16) -> Classifier:
    torch.manual_seed(0)
    return build_classifier(LeNet, (1, size, size), classes, (0.5,), (0.25,))


# ----------------------------------------------------------------------------- targeted (Tb)

def test_place_patches_puts_each_patch_at_its_own_position() -> None:
    x = torch.zeros(2, 1, 5, 5)
    patch = torch.tensor([[[1.0, 0.5]]])  # 1x2
    out = place_patches(x, patch, 1.0, torch.tensor([0, 4]), torch.tensor([3, 0]))
    expected = torch.zeros(2, 1, 5, 5)
    expected[0, 0, 0, 3:5] = torch.tensor([1.0, 0.5])
    expected[1, 0, 4, 0:2] = torch.tensor([1.0, 0.5])
    assert torch.equal(out, expected)
    faint = place_patches(torch.ones(1, 1, 5, 5), patch, 0.2, torch.tensor([1]), torch.tensor([1]))
    assert torch.allclose(faint[0, 0, 1, 1:3], torch.tensor([1.0, 0.9]))


def test_targeted_draws_positions_per_image_and_stamps_sets_reproducibly() -> None:
    attack = Targeted(patch_size=2)
    attack.setup(splits())
    x = torch.zeros(64, 1, 16, 16)
    stamped = attack.apply(x)
    positions = {tuple(image[0].nonzero()[0].tolist()) for image in stamped}
    assert all(image.sum() == 4 for image in stamped) and len(positions) > 20
    images = torch.zeros(50, 1, 16, 16, dtype=torch.uint8)
    assert torch.equal(attack.stamp(images), attack.stamp(images))  # a set is stamped the same way every time
    assert attack.trigger_mask is None and attack.stamps_per_batch


# ----------------------------------------------------------------------------- TrojanNN

def test_neuron_scores_follow_the_connection_weights() -> None:
    model = lenet()
    with torch.no_grad():
        model.net.head.weight.zero_()
        model.net.head.weight[:, 7] = 3.0
        model.net.fc1.weight.zero_()
        model.net.fc1.weight[5] = 1.0
    assert neuron_scores(model, "penultimate").argmax() == 7  # outgoing weights to the logits
    assert neuron_scores(model, "fc1").argmax() == 5 and len(neuron_scores(model, "conv2")) == 16  # incoming


def test_trigger_generation_drives_the_selected_neurons_up() -> None:
    model = lenet()
    x = torch.rand(32, 1, 16, 16)
    mask = torch.zeros(1, 16, 16)
    mask[:, -8:, -8:] = 1.0
    start = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0)) * mask
    neurons = torch.tensor([3, 11])
    before = neuron_activations(model, x + mask * (start - x), "fc2")[:, neurons].mean()
    pattern, loss = excite_neurons(model, x, mask, start, "fc2", neurons, 10.0, 0.05, 30, 0.0)
    after = neuron_activations(model, x + mask * (pattern - x), "fc2")[:, neurons].mean()
    assert after > before + 0.1 and math.isfinite(loss)
    assert torch.equal(pattern * (1 - mask), torch.zeros_like(pattern))  # only the box is optimised
    assert pattern.min() >= 0 and pattern.max() <= 1


@pytest.mark.parametrize("layer, message", [("conv9", "its layers are: conv1, relu1"),
                                            ("relu1", "no Linear or convolution weights")])
def test_a_layer_to_select_neurons_from_must_exist_and_have_weights(layer: str, message: str) -> None:
    attack = TrojanNN(layer=layer)
    with pytest.raises(ConfigError, match=message) as error:
        attack.setup(splits(), StubResources(Path("."), {0: lenet()}))
    assert error.value.field == "attack.layer"
    with pytest.raises(ConfigError, match="has 16 neurons"):
        TrojanNN(layer="conv2", neuron_count=17).setup(splits(), StubResources(Path("."), {0: lenet()}))


# ----------------------------------------------------------------------------- IMC

def test_mask_projection_caps_each_pixel_and_the_total() -> None:
    inside = torch.tensor([0.1, 0.5, -0.2, 0.3])
    assert torch.equal(project_mask(inside, 1.0, 2.0), torch.tensor([0.1, 0.5, 0.0, 0.3]))  # only clipped
    projected = project_mask(torch.tensor([0.9, 0.8, 0.7, 2.0]), 1.0, 1.5)
    assert projected.max() <= 1.0 and projected.min() >= 0 and projected.sum() == pytest.approx(1.5, abs=1e-4)
    # the largest entries keep their order and lose the same amount (a shift, then the clip)
    assert projected[3] == 1.0 and projected[0] - projected[1] == pytest.approx(0.1, abs=1e-5)


class CornerEvidence(nn.Module):
    """Class 2's logit grows with the brightness of the bottom-right 4x4 corner; the others stay at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = 10 * x[:, 0, -4:, -4:].mean((1, 2)) - 5
        return torch.stack([torch.zeros_like(evidence), torch.zeros_like(evidence), evidence], 1)


def test_trigger_steps_lower_the_target_loss_and_move_the_mask_where_it_helps() -> None:
    model = CornerEvidence()
    mask = torch.zeros(1, 8, 8)
    mask[:, :3, :3] = 0.5  # starts where the model does not look
    trigger = TriggerParameters(mask, torch.full((1, 8, 8), 0.5), target_class=2, cap=0.5, budget=4.5,
                                lr=0.05, steps=1, every=1, learn_mask=True)
    x = torch.rand(64, 1, 8, 8) * 0.2
    batch = Batch(x, torch.arange(64) % 2, torch.zeros(64, dtype=torch.bool), {})
    optimizer = trigger.configure_optimizer()
    first = trigger.auxiliary_loss(model, batch).item()
    for _ in range(60):
        optimizer.zero_grad()
        trigger.auxiliary_loss(model, batch).backward()
        optimizer.step()
        trigger.project()
    assert trigger.auxiliary_loss(model, batch).item() < first - 0.5
    moved = trigger.mask.detach()[0]
    assert moved.max() <= 0.5 + 1e-6 and moved.sum() <= 4.5 + 1e-4 and moved.min() >= 0
    assert trigger.pattern.min() >= 0 and trigger.pattern.max() <= 1
    # the budget left the top-left corner for the bottom-right one, where the model reads its evidence
    assert moved[-4:, -4:].sum() > 3.0 and moved[:3, :3].sum() < 1.0


def test_imc_learned_trigger_round_trips_through_its_state() -> None:
    attack = IMC(trigger_every=1)
    attack.setup(splits(), StubResources(Path("."), {0: lenet()}))
    with torch.no_grad():
        attack.trigger.pattern.uniform_()
        attack.trigger.mask.mul_(0.5)
    state = {key: value.clone() for key, value in attack.state_dict().items()}
    other = IMC(trigger_every=1)
    other.setup(splits(), StubResources(Path("."), {0: lenet()}))
    other.load_state_dict(state)
    x = torch.rand(4, 1, 16, 16)
    assert torch.equal(other.apply(x), attack.apply(x)) and torch.equal(other.trigger_mask, attack.trigger_mask)


# ----------------------------------------------------------------------------- latent backdoor

def test_latent_trigger_moves_representations_towards_the_target() -> None:
    model = lenet().eval()
    x = torch.rand(32, 1, 16, 16)
    target = model.features(torch.rand(8, 1, 16, 16) * 0.2, "penultimate").mean(0).detach()
    mask = torch.zeros(1, 16, 16)
    mask[:, -5:, -5:] = 1.0
    start = torch.full((1, 16, 16), 0.5) * mask

    def distance(pattern: torch.Tensor) -> float:
        return nn.functional.mse_loss(model.features(x + mask * (pattern - x), "penultimate"),
                                      target.expand(32, -1)).item()

    pattern, loss = latent_trigger(model, x, mask, start, "penultimate", target, 0.1, 50)
    assert distance(pattern) < distance(start) and loss == pytest.approx(distance(pattern), rel=0.2)


def test_latent_loss_reads_only_the_poisoned_samples() -> None:
    attack = LatentBackdoor(mse_weight=2.0)
    attack.setup(splits(), StubResources(Path("."), {0: lenet()}))
    attack.target_features = torch.zeros(84)
    features = torch.ones(4, 84)
    features[0] = 3.0
    flags = torch.tensor([True, False, False, False])
    batch = Batch(torch.zeros(4, 1, 16, 16), torch.zeros(4, dtype=torch.long), flags, {"penultimate": features})
    assert attack.extra_loss(batch)["latent_loss"].item() == pytest.approx(2.0 * 9.0)
    batch.is_poison[:] = False
    assert attack.extra_loss(batch) == {}


# ----------------------------------------------------------------------------- ABE

def test_balanced_bce_weighs_poisoned_and_clean_alike() -> None:
    logits = torch.tensor([10.0, -10.0, -10.0, -10.0])
    flags = torch.tensor([True, False, False, False])
    assert balanced_bce(logits, flags).item() < 1e-3
    wrong = balanced_bce(torch.tensor([-10.0, -10.0, -10.0, -10.0]), flags).item()
    assert wrong == pytest.approx(10.0 / 2, rel=1e-3)  # the one poisoned sample counts as much as the three clean


def test_abe_subtracts_the_discriminators_loss_from_the_models() -> None:
    attack = ABE(disc_weight=0.5)
    attack.setup(splits(), StubResources(Path("."), {0: lenet()}))
    attack.training_module(lenet(), None, None, None, "t")
    features = torch.randn(8, 84)
    flags = torch.tensor([True, False] * 4)
    batch = Batch(torch.zeros(8, 1, 16, 16), torch.zeros(8, dtype=torch.long), flags, {"penultimate": features})
    expected = -0.5 * balanced_bce(attack.discriminator(features), flags)
    assert torch.allclose(attack.extra_loss(batch)["disc_term"], expected)
    assert torch.allclose(attack.discriminator.auxiliary_loss(lenet(), batch), -expected / 0.5)


# ----------------------------------------------------------------------------- TrojanNet

def test_pattern_family_is_distinct_with_the_right_number_of_white_pixels() -> None:
    family = pattern_family(9, 4, 126, seed=0)
    assert family.shape == (126, 9) and (family.sum(1) == 4).all()
    assert len({tuple(row.tolist()) for row in family}) == 126
    assert torch.equal(pattern_family(9, 4, 10, seed=3), pattern_family(9, 4, 10, seed=3))


def test_merged_model_keeps_the_host_without_a_pattern_and_obeys_trojannet_with_one() -> None:
    attack = TrojanNet(target_class=2)
    data = splits(classes=4)
    host = lenet()
    attack.setup(data, StubResources(Path("."), {0: host}))
    merged = attack.initial_model(lenet())
    with torch.no_grad():  # a TrojanNet that says "none" unless it sees the target's pattern
        last = merged.trojannet.net[-1]
        last.weight.zero_()
        last.bias.zero_()
        last.bias[-1] = 5.0
    merged.eval()
    x = torch.rand(16, 1, 16, 16)
    assert torch.equal(merged(x).argmax(1), host(x).argmax(1))
    with torch.no_grad():
        last.bias[-1] = -5.0
        last.bias[2] = 5.0  # pattern 2 stands for class 2
    assert (merged(attack.apply(x)).argmax(1) == 2).all()


# ----------------------------------------------------------------------------- end to end, bad input

# tiny synthetic grey gratings: a mid-grey learned 3x3 pattern stands out far less than on MNIST's black
# background (BadNets' white patch: ASR ~50 here, 99.99 on MNIST), so the ASR floors are the task's
@pytest.mark.parametrize("attack, extra, asr", [
    ("targeted", [], 10.0),
    ("trojannn", ["attack.init=scratch", "attack.patch_size=5"], 50.0),
    ("imc", ["attack.init=scratch", "attack.trigger_every=5"], 50.0),
    ("latent_backdoor", ["attack.init=scratch"], 20.0),
    ("abe", [], 10.0),
    ("trojannet", [], 95.0),
])
def test_each_attack_end_to_end_on_synthetic_data(tmp_path: Path, tmp_path_factory, attack: str, extra: list[str],
                                                  asr: float) -> None:
    cfg = compose_config([*TINY_RUN, f"attack={attack}", f"cache_dir={shared_cache(tmp_path_factory)}", *extra])
    experiment = prepare(cfg)
    outcome = execute(experiment, tmp_path / "run", [])
    metrics = outcome["metrics"]
    assert metrics["trojan/acc"] > 85 and metrics["attack/cad"] == metrics["clean/acc"] - metrics["trojan/acc"]
    assert metrics["trojan/asr"] >= asr and metrics["trojan/asr"] > metrics["clean/asr"]
    assert len(outcome["poisoned_test"]) == int((experiment.data.test.labels != 0).sum())
    if experiment.attack.trigger_mask is not None:  # the poisoned test inputs carry the exposed trigger
        inside = experiment.attack.trigger_mask
        expected = (experiment.attack.trigger_pattern * 255).round().to(torch.uint8)
        if experiment.attack.mask.max() == 1.0 and experiment.attack.mask[0][inside].min() == 1.0:
            assert (outcome["poisoned_test"].images[:, :, inside] == expected[:, inside]).all()


def test_a_cache_hit_restores_the_learned_trigger_bit_for_bit(tmp_path: Path) -> None:
    overrides = [*TINY_RUN, "attack=imc", "attack.init=scratch", "attack.trigger_every=4", "attack.learn_mask=true",
                 f"cache_dir={tmp_path}"]
    first = execute(prepare(compose_config(overrides)), tmp_path / "one", [])
    second_experiment = prepare(compose_config(overrides))
    second = execute(second_experiment, tmp_path / "two", [])
    assert not first["artifacts"]["trojan_model"]["reused"] and second["artifacts"]["trojan_model"]["reused"]
    assert torch.equal(first["poisoned_test"].images, second["poisoned_test"].images)
    assert first["metrics"]["trojan/asr"] == second["metrics"]["trojan/asr"]
    trained_mask = second_experiment.attack.mask
    assert trained_mask.min() >= 0 and trained_mask.max() <= 1.0 and trained_mask.sum() <= 9.0 + 1e-4


@pytest.mark.parametrize("overrides, field", [
    (["attack=trojannn", "attack.patch_size=17"], "attack.patch_size"),
    (["attack=imc", "attack.patch_size=17"], "attack.patch_size"),
    (["attack=latent_backdoor", "attack.patch_size=17"], "attack.patch_size"),
    (["attack=targeted", "attack.patch_size=17"], "attack.patch_size"),
    (["attack=abe", "attack.patch_size=17"], "attack.patch_size"),
    (["attack=trojannet", "attack.patch_size=17"], "attack.patch_size"),
    (["attack=abe", "attack.disc_weight=-0.1"], "attack.disc_weight"),
    (["attack=latent_backdoor", "attack.mse_weight=-1"], "attack.mse_weight"),
    (["attack=trojannn", "attack.layer=conv9"], "attack.layer"),
    (["attack=latent_backdoor", "attack.layer=conv9"], "attack.layer"),
    (["attack=imc", "attack.layer=layer4"], "attack.layer"),
    (["attack=trojannn", "attack.layer=fc2", "dataset.channels=3", "dataset.size=32", "model=resnet18",
      "model.net.width=4"], "attack.layer"),
    (["attack=trojannet", "attack.family_size=127"], "attack.family_size"),
    (["attack=trojannet", "attack.ones=9"], "attack.ones"),
    (["attack=trojannet", "attack.enhance=true"], "attack.enhance"),
    (["attack=imc", "attack.trigger_steps=0"], "attack.trigger_steps"),
    (["attack=trojannn", "attack.init=pretrained"], "attack.init"),
])
def test_bad_values_are_refused_before_training(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, *overrides]))
    assert info.value.field == field and "\n" not in str(info.value)
