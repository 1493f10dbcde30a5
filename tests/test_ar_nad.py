"""Adversarial retraining and NAD: PGD examples inside the ball, the attention map and loss, the planted
backdoor removed end to end, and every bad value refused before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchattacks
from torch.nn import functional as F

from bdlab.compose import compose_config
from bdlab.datasets.base import ImageSet
from bdlab.defenses.model_sanitisation import adversarial_retraining
from bdlab.defenses.model_sanitisation.adversarial_retraining import (
    AdversarialRetraining,
    AdversarialTraining,
    make_pgd,
    pgd_defaults,
)
from bdlab.defenses.model_sanitisation.nad import NAD, attention_loss, attention_map, default_attention_layer
from bdlab.errors import ConfigError
from bdlab.models.classifier import Classifier
from bdlab.models.lenet import LeNet
from bdlab.pipeline import execute, prepare
from bdlab.training.fit import fit_classifier
from bdlab.training.recipe import TrainingRecipe
from tests.conftest import TINY_RUN, make_splits
from tests.test_sanitization import PLANTED
from tests.test_transforms import shared_cache


def lenet(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(LeNet(1, 10, (16, 16)), (0.5,), (0.25,)).eval()


def test_attention_map_is_the_normalised_channel_mean_of_squares() -> None:
    activation = torch.zeros(2, 3, 2, 2)
    activation[0, 0] = torch.tensor([[3.0, 0.0], [0.0, 0.0]])
    activation[0, 1] = torch.tensor([[0.0, 0.0], [0.0, -4.0]])  # the sign does not matter: |a|^p
    activation[1, :, 1, 0] = 2.0
    maps = attention_map(activation, p=2)
    # sample 0: channel means of squares (9/3, 0, 0, 16/3), L2-normalised -> (9, 0, 0, 16) / sqrt(337)
    assert maps.shape == (2, 4)
    assert torch.allclose(maps[0], torch.tensor([9.0, 0.0, 0.0, 16.0]) / 337 ** 0.5, atol=1e-5)
    assert torch.allclose(maps[1], torch.tensor([0.0, 0.0, 1.0, 0.0]), atol=1e-5)
    assert torch.allclose(attention_map(activation, p=1)[0], torch.tensor([3.0, 0.0, 0.0, 4.0]) / 5, atol=1e-5)


def test_attention_loss_is_zero_for_rescaled_maps_and_grows_with_the_difference() -> None:
    student = torch.rand(4, 8, 5, 5)
    assert attention_loss(student, 3 * student).item() == pytest.approx(0.0, abs=1e-8)  # maps are scale-free
    moved = student.clone()
    moved[:, :, 0, 0] += 5.0
    far = student.clone()
    far[:, :, 0, 0] += 50.0
    expected = F.mse_loss(attention_map(student), attention_map(moved))
    assert attention_loss(student, moved).item() == pytest.approx(expected.item())
    assert 0 < attention_loss(student, moved) < attention_loss(student, far)


def test_pgd_examples_stay_in_the_ball_and_raise_the_loss() -> None:
    model = lenet()
    torch.manual_seed(1)
    x = torch.rand(32, 1, 16, 16)
    labels = model(x).argmax(1)
    epsilon = 0.05
    adversarial = make_pgd(model, epsilon, 0.01, 10)(x, labels)
    assert (adversarial - x).abs().max() <= epsilon + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    with torch.no_grad():
        assert F.cross_entropy(model(adversarial), labels) > F.cross_entropy(model(x), labels) + 0.01
    assert not model.training  # the attack leaves an eval-mode model in eval mode


def test_pgd_budget_follows_the_dataset_and_explicit_values_win() -> None:
    assert pgd_defaults(1) == (0.3, 0.05, 10) and pgd_defaults(3) == (8 / 255, 2 / 255, 7)
    grey = make_splits(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    colour = make_splits(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    defense = AdversarialRetraining()
    defense.setup(colour, None)
    assert defense.settings()["epsilon"] == pytest.approx(8 / 255) and defense.settings()["iterations"] == 7
    chosen = AdversarialRetraining(epsilon=0.1, iterations=3)
    chosen.setup(grey, None)
    assert (chosen.epsilon, chosen.step, chosen.iterations) == (0.1, 0.05, 3)


def test_warmup_grows_the_pgd_radius_linearly_batch_by_batch(monkeypatch) -> None:
    used: list[tuple[float, float, float]] = []  # (radius, step, largest perturbation) per batch

    class RecordingPGD(torchattacks.PGD):
        def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            adversarial = super().forward(images, labels)
            used.append((self.eps, self.alpha, (adversarial - images).abs().max().item()))
            return adversarial

    monkeypatch.setattr(adversarial_retraining, "make_pgd", lambda model, epsilon, step, iterations:
                        RecordingPGD(model, eps=epsilon, alpha=step, steps=iterations, random_start=True))
    torch.manual_seed(0)
    train = ImageSet(torch.randint(0, 256, (40, 1, 16, 16), dtype=torch.uint8), torch.randint(0, 10, (40,)))
    recipe = TrainingRecipe.from_config(compose_config([*TINY_RUN, "model.batch_size=10"])).variant(3, 0.01)
    fit_classifier(lenet(), train, recipe, None, AdversarialTraining(0.3, 0.05, 2, warmup_epochs=2), seed=0)
    shares = [k / 8 for k in range(1, 9)] + [1.0] * 4  # 8 warm-up batches, then the full ball
    assert [radius for radius, _, _ in used] == pytest.approx([0.3 * share for share in shares])
    assert [step for _, step, _ in used] == pytest.approx([0.05 * share for share in shares])
    assert all(largest <= radius + 1e-6 for radius, _, largest in used)
    assert used[-1][2] > 0.2  # the full radius is reached, not only scheduled


def test_default_attention_layer_is_the_last_convolutional_block() -> None:
    assert default_attention_layer(lenet()) == "relu2"
    NAD().check_model(lenet())
    with pytest.raises(ConfigError) as info:
        defense = NAD(layers=["fc1"])
        defense.setup(make_splits(torch.zeros(4, 1, 16, 16, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)),
                      None)
        defense.check_model(lenet())
    assert info.value.field == "defense.layers" and "relu2" in str(info.value)


def sanitised(tmp_path: Path, tmp_path_factory, name: str, overrides: list[str]) -> dict:
    cfg = compose_config([*PLANTED, *overrides, f"cache_dir={shared_cache(tmp_path_factory)}"])
    return execute(prepare(cfg), tmp_path / name, [])["metrics"]


# 16x16 gratings with 120 held-out images: eps = 0.3 (or 0.1) leaves nothing to learn (accuracy falls to
# chance), 0.04 keeps the task
SMALL_AR = ["defense=adversarial_retraining", "defense.data=held_out", "defense.warmup_epochs=0",
            "defense.step=0.01", "defense.iterations=5", "defense.epochs=30"]


@pytest.mark.parametrize("data, images", [("train", 2000), ("held_out", 120)])
def test_retraining_data_is_the_clean_training_split_or_the_held_out_one(tmp_path: Path, tmp_path_factory, monkeypatch,
                                                                        data: str, images: int) -> None:
    trained: list[tuple] = []
    monkeypatch.setattr(adversarial_retraining, "fit_classifier", lambda *args, **kwargs: trained.append(args))
    sanitised(tmp_path, tmp_path_factory, f"data_{data}", ["defense=adversarial_retraining", f"defense.data={data}",
                                                          "defense.iterations=1", "defense.epochs=2"])
    _, train, _, _, hooks = trained[0]
    assert len(train) == images
    assert isinstance(hooks, AdversarialTraining) and hooks.warmup_epochs == 1  # the default warm-up reaches them


def test_adversarial_retraining_lowers_the_planted_backdoor(tmp_path: Path, tmp_path_factory) -> None:
    metrics = sanitised(tmp_path, tmp_path_factory, "ar", [*SMALL_AR, "defense.epsilon=0.04"])
    assert metrics["trojan/asr"] > 80
    assert metrics["defense/asr"] < metrics["trojan/asr"] - 30 and metrics["defense/acc"] > 70
    assert metrics["defense/robust_acc"] > metrics["defense/robust_acc_before"] + 20
    assert metrics["defense/epsilon"] == pytest.approx(0.04) and metrics["defense/iterations"] == 5
    # the same training in a ball too small to matter is plain fine-tuning: the backdoor stays
    control = sanitised(tmp_path, tmp_path_factory, "control", [*SMALL_AR, "defense.epsilon=0.002"])
    assert control["defense/asr"] > 80


SMALL_NAD = ["defense=nad", "defense.teacher_epochs=30", "defense.teacher_lr=0.03", "defense.epochs=20",
             "defense.lr=0.005", "defense.batch_size=32"]


def test_nad_lowers_the_planted_backdoor_where_fine_tuning_alone_does_not(tmp_path: Path, tmp_path_factory) -> None:
    metrics = sanitised(tmp_path, tmp_path_factory, "nad", SMALL_NAD)
    assert metrics["trojan/asr"] > 80 and metrics["defense/teacher_asr"] < 50
    assert metrics["defense/asr"] < metrics["trojan/asr"] - 50 and metrics["defense/acc"] > 90
    # beta = 0 is the same student training without the attention term: the backdoor stays
    control = sanitised(tmp_path, tmp_path_factory, "control", [*SMALL_NAD, "defense.beta=0"])
    assert control["defense/asr"] > 80


@pytest.mark.parametrize("overrides, field", [
    (["defense=adversarial_retraining", "defense.epsilon=0"], "defense.epsilon"),
    (["defense=adversarial_retraining", "defense.epsilon=-0.1"], "defense.epsilon"),
    (["defense=adversarial_retraining", "defense.step=0"], "defense.step"),
    (["defense=adversarial_retraining", "defense.step=-0.01"], "defense.step"),
    (["defense=adversarial_retraining", "defense.iterations=0"], "defense.iterations"),
    (["defense=adversarial_retraining", "defense.epochs=0"], "defense.epochs"),
    (["defense=adversarial_retraining", "defense.data=test"], "defense.data"),
    (["defense=adversarial_retraining", "defense.warmup_epochs=-1"], "defense.warmup_epochs"),
    (["defense=adversarial_retraining", "defense.epochs=3", "defense.warmup_epochs=4"], "defense.warmup_epochs"),
    (["defense=nad", "defense.layers=[conv9]"], "defense.layers"),
    (["defense=nad", "defense.layers=[fc1]"], "defense.layers"),
    (["defense=nad", "defense.layers=[]"], "defense.layers"),
    (["defense=nad", "defense.beta=-1"], "defense.beta"),
    (["defense=nad", "defense.p=0"], "defense.p"),
    (["defense=nad", "defense.teacher_epochs=0"], "defense.teacher_epochs"),
    (["defense=nad", "defense.lr=0"], "defense.lr"),
])
def test_bad_values_are_refused_before_training(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, *overrides]))
    assert info.value.field == field and "\n" not in str(info.value)


@pytest.mark.parametrize("defense", [AdversarialRetraining(), NAD()])
def test_sanitisers_without_a_held_out_split_are_refused(defense) -> None:
    empty = make_splits(torch.zeros(4, 1, 16, 16, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    empty = type(empty)(**{**empty.__dict__, "defense": empty.defense.subset(torch.tensor([], dtype=torch.long))})
    with pytest.raises(ConfigError) as info:
        defense.setup(empty, None)
    assert info.value.field == "dataset.defense_fraction"
