"""ABS, DF-TND, DeepInspect and NeuronInspect: each finds a planted backdoor's target, loses it once the backdoor
is removed, and refuses bad settings before anything is trained."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from bdlab.attacks import BadNets
from bdlab.attacks.base import NoAttack
from bdlab.compose import compose_config
from bdlab.datasets.base import DatasetSplits, ImageSet
from bdlab.defenses.model_inspection.abs import ABS, class_margins, stimulate
from bdlab.defenses.model_inspection.base import InspectionResult, ModelInspection, flagged_classes, inspection_metrics
from bdlab.defenses.model_inspection.deep_inspect import DeepInspect
from bdlab.defenses.model_inspection.df_tnd import DFTND
from bdlab.defenses.model_inspection.neuron_inspect import NeuronInspect, explanation_features
from bdlab.errors import ConfigError
from bdlab.models.classifier import Classifier
from bdlab.pipeline import execute, prepare
from bdlab.training.recipe import TrainingRecipe
from tests.conftest import TINY_RUN, make_services, make_splits

CLASSES, TARGET, TRIGGER = 6, 1, 63  # the trigger: the bottom-right pixel of an 8x8 image, set to white


class Planted(nn.Module):
    """Class ``k`` reads the brightness of image row ``k + 1`` (a clean image of class ``k`` has that row at
    0.8, the rest at 0.1; rows 0 and 7 are read by no class, so every class's row has two neighbours). The backdoor: a hidden neuron that fires only when the bottom-right pixel is near
    white and adds 20 to the target's logit, plus a leak of that pixel into the target (weight 5), so
    the target's explanation of clean images also looks at it. ``backdoor=False`` is the same network
    with both paths cut."""

    def __init__(self, backdoor: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.hidden = nn.Linear(64, CLASSES + 2)
        self.relu = nn.ReLU()
        self.head = nn.Linear(CLASSES + 2, CLASSES)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.zero_()
            weight = torch.zeros(CLASSES + 2, 64)
            for k in range(CLASSES):
                weight[k, 8 * (k + 1):8 * (k + 2)] = 10 / 8
            weight[CLASSES, TRIGGER] = 40.0  # fires above 0.95 only
            weight[CLASSES + 1, TRIGGER] = 1.0
            self.hidden.weight.copy_(weight)
            self.hidden.bias.copy_(torch.tensor([0.0] * CLASSES + [-38.0, 0.0]))
            head = torch.zeros(CLASSES, CLASSES + 2)
            head[:, :CLASSES] = torch.eye(CLASSES)
            head[TARGET, CLASSES:] = torch.tensor([10.0, 5.0]) if backdoor else 0.0
            self.head.weight.copy_(head)
            self.head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.relu(self.hidden(self.conv(x).flatten(1))))


def planted(backdoor: bool = True) -> Classifier:
    return Classifier(Planted(backdoor), (0.0,), (1.0,)).eval()


def rows(n: int = 240, seed: int = 0) -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    images = torch.full((n, 1, 8, 8), 0.1) + torch.rand(n, 1, 8, 8, generator=generator) * 0.05
    for i, k in enumerate(labels.tolist()):
        images[i, 0, k + 1] += 0.7
    return ImageSet((images * 255).round().to(torch.uint8), labels)


def splits():
    data = rows()
    return make_splits(data.images, data.labels, CLASSES)


def inspect(inspector: ModelInspection, model: nn.Module, cache: Path, data: DatasetSplits | None = None,
            ) -> InspectionResult:
    """``inspector`` on ``model`` through run services around it (a CPU recipe for helper networks)."""
    data = data or splits()
    services = make_services(data, NoAttack(), model, cache)
    services.recipe = TrainingRecipe(0, 32, 1, functools.partial(torch.optim.Adam), None,
                                     {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False})
    return inspector.inspect(model, data, services)


def test_the_planted_model_is_accurate_and_its_trigger_works() -> None:
    model, data = planted(), rows()
    x = data.images.float() / 255
    assert (model(x).argmax(1) == data.labels).all()
    stamped = x.clone()
    stamped[:, 0, 7, 7] = 1.0
    assert (model(stamped).argmax(1) == TARGET).all()
    assert (planted(False)(stamped).argmax(1) == data.labels).all()


def test_flags_follow_the_suspicious_side() -> None:
    scores = torch.tensor([1.0, 1.1, 0.9, 1.0, 9.0, -7.0])
    assert flagged_classes(scores, 2.0, "high") == [4]
    assert flagged_classes(scores, 2.0, "low") == [5]
    assert flagged_classes(scores, 2.0, "both") == [4, 5]


# ----------------------------------------------------------------------------- ABS


def test_stimulating_the_backdoor_neuron_lifts_the_target_most() -> None:
    model, data = planted(), rows(36)
    x = data.images.float() / 255
    logits = stimulate(model, x, "hidden", torch.linspace(0, 20, 5))
    assert logits.shape == (CLASSES + 2, 5, 36, CLASSES)
    margins = class_margins(logits, data.labels, 0.75)
    # neuron k lifts class k by its stimulation; the backdoor neuron lifts the target ten times as much
    assert margins[:, TARGET].argmax().item() == CLASSES
    assert margins[CLASSES, TARGET] > 5 * margins[TARGET, TARGET] > 0
    assert margins[CLASSES, 0] < 0  # and it lifts no other class


def test_abs_flags_the_target_by_reasr_and_not_once_the_backdoor_is_gone(tmp_path: Path) -> None:
    # the hidden layer: stimulating the 1-channel convolution whitens the whole image, trigger included
    abs_ = ABS(layers=["hidden"], seed_images=36, candidates=1, steps=60, lr=0.3, max_size=2.0, size_weight=1.0,
               optimisation_images=120, evaluation_images=100)
    trojan = inspect(abs_, planted(), tmp_path)
    assert trojan.scores[TARGET] > 90 and trojan.scores[[k for k in range(CLASSES) if k != TARGET]].max() < 10
    assert trojan.flagged == [TARGET] and trojan.success[TARGET] > 90
    assert trojan.trigger.footprint[TARGET, 0].flatten().argmax().item() == TRIGGER
    clean = inspect(abs_, planted(False), tmp_path)
    assert clean.scores[TARGET] < 10 and clean.flagged == []


def test_abs_flags_only_classes_whose_reasr_reaches_the_bound(tmp_path: Path) -> None:
    abs_ = ABS(optimisation_images=40, evaluation_images=20)
    reasr = torch.tensor([0.0, 0.0, 0.0, 2.0, 0.0, 0.0])  # a MAD of 0: the 2% class has an infinite AIV
    abs_.score = lambda *args, **kwargs: {"score": reasr}
    assert inspect(abs_, planted(), tmp_path).flagged == []
    abs_.min_reasr = 0.0
    assert inspect(abs_, planted(), tmp_path).flagged == [3]


# ----------------------------------------------------------------------------- DF-TND


def test_df_tnd_finds_the_target_from_noise_and_not_once_the_backdoor_is_gone(tmp_path: Path) -> None:
    df_tnd = DFTND(seed_count=16, steps=60, lr=0.05, optimisation_images=40, evaluation_images=40)
    trojan = inspect(df_tnd, planted(), tmp_path)
    others = trojan.scores[[k for k in range(CLASSES) if k != TARGET]]
    assert trojan.scores[TARGET] > 2 * others.max() and trojan.flagged == [TARGET]
    assert trojan.trigger.delta[TARGET, 0, 7, 7] > 0.8  # the trigger pixel (besides the target's row)
    assert trojan.trigger.delta[[k for k in range(CLASSES) if k != TARGET], 0, 7, 7].abs().max() < 0.1
    clean = inspect(df_tnd, planted(False), tmp_path)
    assert clean.scores[TARGET] < trojan.scores[TARGET] / 2 and TARGET not in clean.flagged


# ----------------------------------------------------------------------------- DeepInspect


def test_deep_inspect_needs_a_smaller_perturbation_for_the_target(tmp_path: Path) -> None:
    deep_inspect = DeepInspect(noise_dim=8, width=8, epochs=30, batch_size=30, lr=0.05, gamma=0.1, samples=1,
                               zero_start=True, optimisation_images=120, evaluation_images=60)
    model = planted()  # (its layers' default init draws from the global RNG)
    state = torch.random.get_rng_state()
    trojan = inspect(deep_inspect, model, tmp_path)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded under forked RNGs: the run's is untouched
    others = trojan.scores[[k for k in range(CLASSES) if k != TARGET]]
    # the benign classes cluster tightly, so one of them may pass AIV 2 too; the target stands out most
    assert trojan.scores[TARGET] < others.min() / 2 and TARGET in trojan.flagged
    assert trojan.aiv[TARGET] == trojan.aiv.max() and trojan.extras["generated_asr"][TARGET] > 80
    clean = inspect(deep_inspect, planted(False), tmp_path)
    assert clean.scores[TARGET] > 2 * trojan.scores[TARGET] and TARGET not in clean.flagged
    assert clean.extras["generated_asr"][TARGET] > 80  # reached, not given up on


# ----------------------------------------------------------------------------- NeuronInspect


def test_explanation_features_on_hand_built_maps() -> None:
    block = torch.zeros(4, 8, 8)
    block[:, :2, :2] = 2.0  # the same 4 pixels, everywhere: sparse, persistent
    sparsity, smoothness, persistence = explanation_features(block, 4 / 64)
    assert sparsity.item() == pytest.approx(4 / 64) and persistence.item() == pytest.approx(1.0)
    assert smoothness.item() == pytest.approx(2 * 2 / 56)  # 2 vertical + 2 horizontal edges of 56 pairs each
    moving = torch.zeros(4, 8, 8)
    for i in range(4):
        moving[i, 2 * i:2 * i + 2, :2] = 1.0  # a block at a new place in each image
    assert explanation_features(moving, 4 / 64)[2].item() == pytest.approx(0.25)


def test_neuron_inspect_singles_out_the_target_and_not_once_the_backdoor_is_gone(tmp_path: Path) -> None:
    neuron_inspect = NeuronInspect(optimisation_images=60)
    trojan = inspect(neuron_inspect, planted(), tmp_path)
    assert trojan.flagged == [TARGET] and trojan.extras["sparsity"][TARGET] < trojan.extras["sparsity"][0]
    assert inspect(NeuronInspect(side="low", optimisation_images=60), planted(), tmp_path / "low").flagged == []
    clean = inspect(neuron_inspect, planted(False), tmp_path)
    assert clean.flagged == [] and clean.aiv[TARGET] < 2


def test_target_metrics_carry_the_trigger_or_read_not_applicable(tmp_path: Path) -> None:
    data = splits()
    badnets = BadNets(patch_size=1, target_class=TARGET)
    badnets.setup(data)
    df_tnd = DFTND(seed_count=8, steps=5, optimisation_images=20, evaluation_images=20)
    metrics = inspection_metrics(inspect(df_tnd, planted(), tmp_path, data), "defense/", badnets)
    assert not math.isnan(metrics["defense/pixels"]) and not math.isnan(metrics["defense/trigger_asr"])
    neuron = NeuronInspect(optimisation_images=20)
    metrics = inspection_metrics(inspect(neuron, planted(), tmp_path, data), "defense/", badnets)
    assert metrics["defense/target_flagged"] in (0.0, 1.0) and math.isnan(metrics["defense/mln"])


# ----------------------------------------------------------------------------- bad input


# within the tiny run's held-out split, so the model checks are reached
SMALL_ABS = ["defense=abs", "dataset.defense_fraction=0.4", "defense.optimisation_images=60",
             "defense.evaluation_images=20"]


@pytest.mark.parametrize("overrides, field", [
    ([*SMALL_ABS, "defense.layers=[conv9]"], "defense.layers"),
    ([*SMALL_ABS, "defense.layers=[relu1]"], "defense.layers"),
    ([*SMALL_ABS, "defense.layers=[]"], "defense.layers"),
    ([*SMALL_ABS, "defense.candidates=17"], "defense.candidates"),
    (["defense=abs", "defense.steps=0"], "defense.steps"),
    (["defense=abs", "defense.levels=1"], "defense.levels"),
    (["defense=abs", "defense.seed_images=200"], "defense.seed_images"),
    (["defense=abs", "defense.consistency=0"], "defense.consistency"),
    (["defense=abs", "defense.min_reasr=101"], "defense.min_reasr"),
    (["defense=df_tnd", "defense.steps=0"], "defense.steps"),
    (["defense=df_tnd", "defense.seeds=gan"], "defense.seeds"),
    (["defense=df_tnd", "defense.seeds=images", "defense.seed_count=60"], "defense.seed_count"),
    (["defense=df_tnd", "defense.optimisation_images=100000"], "defense.optimisation_images"),
    (["defense=deep_inspect", "defense.epochs=0"], "defense.epochs"),
    (["defense=deep_inspect", "defense.gamma=0"], "defense.gamma"),
    (["defense=neuron_inspect", "defense.top=0"], "defense.top"),
    (["defense=neuron_inspect", "defense.side=left"], "defense.side"),
    (["defense=neuron_inspect", "defense.aiv_threshold=0"], "defense.aiv_threshold"),
])
def test_bad_score_inspection_values_are_refused_before_training(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, *overrides]))
    assert info.value.field == field and "\n" not in str(info.value)
    if "defense.layers=[conv9]" in overrides:
        assert "conv2" in str(info.value)  # the line lists the model's layers


def test_df_tnd_runs_end_to_end_on_the_tiny_run(tmp_path: Path, tmp_path_factory) -> None:
    from tests.test_transforms import shared_cache

    cfg = compose_config([*TINY_RUN, "attack.patch_size=4", "attack.poison_rate=0.2", "defense=df_tnd",
                          "defense.steps=20", "dataset.defense_fraction=0.4", "defense.optimisation_images=60",
                          "defense.evaluation_images=50",
                          f"cache_dir={shared_cache(tmp_path_factory)}"])
    metrics = execute(prepare(cfg), tmp_path / "run", [])["metrics"]
    assert len(metrics["defense/per_class/score"]) == 10 and len(metrics["defense/clean_per_class/aiv"]) == 10
    assert metrics["defense/aiv_target"] == pytest.approx(metrics["defense/per_class/aiv"][0])
    assert metrics["defense/target_flagged"] == float(0 in metrics["defense/flagged_classes"])
    assert metrics["defense/art_s"] > 0 and (tmp_path / "run" / "inspection_trojan.png").is_file()
    again = execute(prepare(cfg), tmp_path / "again", [])["metrics"]
    assert again["defense/per_class/score"] == metrics["defense/per_class/score"]  # read from the cache


# ----------------------------------------------------------------------------- unlearning with any recovered trigger


@pytest.mark.parametrize("name", ["df_tnd", "neuron_inspect"])
def test_unlearning_refuses_inspectors_that_recover_no_trigger(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, "defense=unlearning", f"defense.inspector={name}"]))
    assert info.value.field == "defense.inspector" and "\n" not in str(info.value)


def test_unlearning_takes_a_trigger_recovering_inspector_by_its_option_name() -> None:
    from bdlab.defenses.model_inspection.k_arm import KArm
    from bdlab.errors import build

    for name, cls in (("abs", ABS), ("deep_inspect", DeepInspect), ("k_arm", KArm)):
        cfg = compose_config([*TINY_RUN, "defense=unlearning", f"defense.inspector={name}", "seed=3"])
        defense = build(cfg.defense)
        assert type(defense.inspector) is cls and defense.inspector.seed == 3
    cfg = compose_config([*TINY_RUN, "defense=unlearning", "defense@defense.inspector=abs",
                          "defense.inspector.steps=7"])
    assert build(cfg.defense).inspector.steps == 7
    with pytest.raises(ConfigError) as info:  # the inspector's own model checks run before training
        prepare(compose_config([*TINY_RUN, "defense=unlearning", "defense@defense.inspector=abs",
                                "defense.inspector.layers=[conv9]", "dataset.defense_fraction=0.4",
                                "defense.inspector.optimisation_images=60", "defense.inspector.evaluation_images=20"]))
    assert info.value.field == "defense.layers"


def test_unlearning_unlearns_the_trigger_abs_recovers(tmp_path: Path) -> None:
    from bdlab.defenses.model_sanitisation.unlearning import Unlearning

    abs_ = ABS(layers=["hidden"], seed_images=36, candidates=1, steps=60, lr=0.3, max_size=2.0, size_weight=1.0,
               optimisation_images=120, evaluation_images=100)
    data, model = splits(), planted()
    services = make_services(data, NoAttack(), model, tmp_path)
    services.recipe = TrainingRecipe(0, 32, 1, functools.partial(torch.optim.Adam), None,
                                     {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False})
    unlearning = Unlearning(abs_, share=0.5, epochs=1, lr=0.01)
    trigger = abs_.inspect(model, data, services, services.trojan_key()).trigger  # what sanitize reads, cached
    stamped = unlearning.stamped(data.defense, trigger, [TARGET])
    assert (stamped.images[:, 0, 7, 7] > 240).sum() >= 0.5 * len(data.defense)  # the recovered trigger pixel
    assert unlearning.sanitize(model, services) == {"unlearnt_classes": 1}
