"""Spectral signatures and activation clustering: planted outliers, the protocol, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from bdlab.attacks.badnets import BadNets
from bdlab.attacks.base import NoAttack
from bdlab.defenses.data_filtering.activation_clustering import ActivationClustering
from bdlab.defenses.data_filtering.spectral_signature import SpectralSignature
from bdlab.defenses.input_filtering.base import roc_auc
from bdlab.errors import ConfigError
from bdlab.evaluate import Evaluation
from bdlab.models.classifier import Classifier
from bdlab.services import RunServices
from tests.conftest import make_services, make_splits


def planted_features(per_class: int = 200, planted: int = 20, dims: int = 32) -> tuple:
    """Gaussian features for 5 classes; ``planted`` samples of class 0 are shifted far along one direction."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(5 * per_class, dims, generator=generator)
    labels = torch.arange(5).repeat_interleave(per_class)
    direction = torch.randn(dims, generator=generator)
    features[:planted] += 6 * direction / direction.norm()
    is_poison = torch.zeros(len(labels), dtype=torch.bool)
    is_poison[:planted] = True
    return features, labels, is_poison


def test_spectral_signature_recovers_planted_outliers() -> None:
    features, labels, is_poison = planted_features()
    scores, flags = SpectralSignature(poison_fraction=0.1).detect(features, labels)
    assert flags[is_poison].all()  # 1.5 * 0.1 * 200 = 30 removed per class, the 20 planted among them
    assert flags.sum() == 5 * 30
    assert roc_auc(scores[~is_poison], scores[is_poison]) > 0.99


def test_spectral_signature_at_half_a_class_needs_the_clean_centre() -> None:
    """Poison = half of class 0: the class mean sits between the clusters and Alg. 1 ranks at chance;
    centring on held-out clean features of the class finds the poison."""
    features, labels, is_poison = planted_features(planted=100)
    generator = torch.Generator().manual_seed(3)
    clean = (torch.randn(5 * 40, features.shape[1], generator=generator), torch.arange(5).repeat_interleave(40))
    scores, _ = SpectralSignature(poison_fraction=0.5).detect(features, labels)
    class_zero = labels == 0
    assert abs(roc_auc(scores[class_zero & ~is_poison], scores[is_poison]) - 0.5) < 0.2
    defense = SpectralSignature(poison_fraction=0.5, centre="clean_mean")
    scores, flags = defense.detect(features, labels, clean)
    assert roc_auc(scores[class_zero & ~is_poison], scores[is_poison]) > 0.99
    assert flags[is_poison].all()  # 1.5 * 0.5 * 200 = 150 removed from class 0, the 100 planted first
    with pytest.raises(ValueError, match="held-out clean"):
        defense.detect(features, labels)


def test_clean_centre_refuses_a_defense_split_missing_a_class() -> None:
    data = make_splits(torch.zeros(20, 1, 4, 4, dtype=torch.uint8), torch.arange(20) % 2, num_classes=3)
    with pytest.raises(ConfigError) as error:
        SpectralSignature(retrain=False, centre="clean_mean").setup(data, NoAttack())
    assert error.value.field == "defense.centre"


def test_activation_clustering_flags_only_the_planted_cluster() -> None:
    features, labels, is_poison = planted_features()
    defense = ActivationClustering(silhouette_threshold=0.2)  # isotropic Gaussian classes split at ~0.08
    scores, flags = defense.detect(features, labels)
    assert flags[is_poison].all() and flags[~is_poison].sum() <= 2  # only class 0 is judged poisoned
    assert roc_auc(scores[~is_poison], scores[is_poison]) > 0.99
    assert defense.class_report[0][1] == pytest.approx(0.1, abs=0.01)  # the smaller cluster: the planted 10%
    assert all(report[0] < defense.silhouette_threshold for label, report in defense.class_report.items() if label)


def test_activation_clustering_with_ica_flags_the_planted_cluster_in_one_component() -> None:
    # ICA whitens every component to unit variance: in 10 of them the one planted direction drowns in isotropic
    # noise (every class splits at ~0.07); reduced to 1, a halved Gaussian class scores ~0.57, the planted one 0.81
    features, labels, is_poison = planted_features()
    defense = ActivationClustering(dims=1, decomposition="ica", silhouette_threshold=0.7)
    scores, flags = defense.detect(features, labels)
    assert flags[is_poison].all() and flags[~is_poison].sum() <= 2


def test_activation_clustering_splits_two_blobs_and_judges_by_size() -> None:
    """A class made of two far blobs (50 + 30) splits along them at a silhouette near 1; by relative size a
    37.5% minority is clean (above 0.35), and at a threshold of 0.4 it is flagged; a Gaussian class never is."""
    generator = torch.Generator().manual_seed(1)
    blobs = torch.cat([torch.randn(50, 4, generator=generator), torch.randn(30, 4, generator=generator) + 20])
    features = torch.cat([blobs, torch.randn(80, 4, generator=generator)])
    labels = torch.arange(2).repeat_interleave(80)
    defense = ActivationClustering(dims=1, criterion="size")
    scores, flags = defense.detect(features, labels)
    assert defense.class_report[0] == (pytest.approx(1.0, abs=0.1), pytest.approx(30 / 80))
    assert defense.class_report[1][1] > 0.4 and not flags.any()
    defense = ActivationClustering(dims=1, criterion="both", size_threshold=0.4)
    scores, flags = defense.detect(features, labels)
    assert flags[50:80].all() and flags.sum() == 30  # the smaller blob, nothing of the Gaussian class
    assert scores[50:80].min() > scores[:50].max()
    assert defense.detect(features, labels)[0].equal(scores)  # seeded: the same split twice


def pixel_feature_context(tmp_path: Path, retrain) -> RunServices:
    """3 classes of dark 4x4 images, BadNets-poisoned at 10%, and a model whose features are the pixels."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 60, (300, 1, 4, 4), dtype=torch.uint8, generator=generator)
    labels = torch.arange(300) % 3
    data = make_splits(images, labels, num_classes=3)
    attack = BadNets(patch_size=1, poison_rate=0.1)
    attack.setup(data)
    model = Classifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), (0.0,), (1.0,))
    undefended = Evaluation(acc=80.0, asr=90.0, clean_logits=torch.zeros(1, 3), poisoned_logits=torch.zeros(1, 3))
    return make_services(data, attack, model, tmp_path, attack.poison_train(data.train), attack.poison_test(data.test),
                         undefended, retrain)


def recording_context(tmp_path: Path) -> tuple[RunServices, list[int]]:
    """:func:`pixel_feature_context` whose retraining returns the trojan model and records each training set's size."""
    retrained: list[int] = []

    def retrain(train_set, tag: str) -> Classifier:
        retrained.append(len(train_set))
        return context.trojan_model()

    context = pixel_feature_context(tmp_path, retrain)
    return context, retrained


def test_train_data_protocol_reports_against_the_true_flags_and_retrains(tmp_path: Path) -> None:
    context, retrained = recording_context(tmp_path)
    # 30 poisoned of 130 class-0 samples: epsilon 0.25 of the class, so 49 are removed there
    metrics = SpectralSignature(poison_fraction=0.25).run(context)
    assert metrics["defense/poison_tpr"] == 100.0 and metrics["defense/poison_roc_auc"] > 0.9
    assert 0 < metrics["defense/poison_fpr"] < 40  # 1.5 epsilon of every class goes, poisoned or not
    assert retrained == [300 - metrics["defense/removed"]]
    assert metrics["defense/ard"] == pytest.approx(90.0 - metrics["defense/asr"])
    assert metrics["defense/cad"] == pytest.approx(80.0 - metrics["defense/acc"])


@pytest.mark.parametrize("centre", ["class_mean", "clean_mean"])
def test_inference_mode_uses_the_input_filtering_protocol(tmp_path: Path, centre: str) -> None:
    context = pixel_feature_context(tmp_path, retrain=None)
    metrics = SpectralSignature(mode="inference", poison_fraction=0.25, centre=centre).run(context)
    assert {"defense/tpr", "defense/fpr", "defense/roc_auc", "defense/threshold"} <= set(metrics)
    assert "defense/poison_tpr" not in metrics


def test_clean_centre_in_the_train_data_protocol(tmp_path: Path) -> None:
    context = pixel_feature_context(tmp_path, retrain=None)
    metrics = SpectralSignature(poison_fraction=0.25, retrain=False, centre="clean_mean").run(context)
    assert metrics["defense/poison_tpr"] == 100.0 and metrics["defense/poison_roc_auc"] > 0.9


def test_retraining_without_a_poisoned_training_set_is_refused() -> None:
    data = make_splits(torch.zeros(20, 1, 4, 4, dtype=torch.uint8), torch.arange(20) % 2, num_classes=2)
    with pytest.raises(ConfigError) as error:
        ActivationClustering(retrain=True).setup(data, NoAttack())
    assert error.value.field == "defense.retrain"
    SpectralSignature(retrain=False).setup(data, NoAttack())  # scoring alone is fine


@pytest.mark.parametrize("make, field", [
    (lambda: SpectralSignature(mode="online"), "defense.mode"),
    (lambda: SpectralSignature(fpr=0.0), "defense.fpr"),
    (lambda: SpectralSignature(poison_fraction=0.0), "defense.poison_fraction"),
    (lambda: SpectralSignature(centre="median"), "defense.centre"),
    (lambda: ActivationClustering(criterion="gap"), "defense.criterion"),
    (lambda: ActivationClustering(dims=0), "defense.dims"),
])
def test_bad_parameters_are_config_errors(make, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        make()
    assert error.value.field == field


def test_spectral_signature_derives_epsilon_from_the_attack() -> None:
    data = make_splits(torch.zeros(20, 1, 4, 4, dtype=torch.uint8), torch.arange(20) % 10)
    defense = SpectralSignature(retrain=False)
    defense.setup(data, BadNets(poison_rate=0.1))
    assert defense.epsilon == pytest.approx(0.5)  # 10% of the set relabelled: half of a balanced class
    defense.setup(data, NoAttack())
    assert defense.epsilon == 0.0
    assert SpectralSignature(poison_fraction=0.2).epsilon == 0.2


def test_a_decision_that_removes_every_sample_leaves_the_retrained_metrics_not_applicable(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    context, retrained = recording_context(tmp_path)
    # 1.5 x 0.7 >= 1: every class is removed whole, as spectral signatures at a 20% dirty-label rate
    metrics = SpectralSignature(poison_fraction=0.7).run(context)
    assert metrics["defense/removed"] == 300 and metrics["defense/poison_tpr"] == 100.0
    assert retrained == []
    assert not {"defense/acc", "defense/asr", "defense/ard", "defense/cad"} & set(metrics)
    assert "removed all 300 training samples" in caplog.text and "defense.removal_factor" in caplog.text
