"""``python -m bdlab.run`` end to end on synthetic data; bad values stop before anything is trained (the command
line's one line and exit 2: test_bad_input.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bdlab.compose import CONFIG_DIR, compose_config
from bdlab.errors import ConfigError
from bdlab.pipeline import prepare
from tests.conftest import TINY_RUN
from tests.test_issba import TINY_ENCODER

REPO = Path(__file__).resolve().parent.parent


def bdlab_run(tmp_path: Path, *overrides: str, run_dir: str = "run") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "bdlab.run", *TINY_RUN, *overrides,
                           f"hydra.run.dir={tmp_path / run_dir}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def test_poisoned_examples_show_poisoned_training_images_under_their_originals(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from bdlab.attacks.base import PoisonedSet
    from bdlab.datasets.base import ImageSet
    from bdlab.media import save_poisoned_examples

    originals = torch.zeros(6, 1, 4, 4, dtype=torch.uint8)
    originals[:, :, 0, 0] = torch.arange(6, dtype=torch.uint8)[:, None] * 40
    changed = originals.clone()
    changed[:, :, 3, 3] = 255
    flags = torch.tensor([False, True, False, True, True, False])
    images = torch.where(flags[:, None, None, None], changed, originals)
    poisoned = PoisonedSet(images, torch.zeros(6, dtype=torch.long), flags)
    media = save_poisoned_examples(ImageSet(originals, torch.zeros(6, dtype=torch.long)), poisoned, tmp_path, count=2)
    picture = np.asarray(Image.open(media["media/poisoned_examples"]).convert("L"))
    tile = 4 * 4  # 4 px upscaled 4 times, tiles separated by 4 px of padding
    assert picture.shape == (2 * tile + 3 * 4, 2 * tile + 3 * 4)
    top_left, top_right = picture[4:4 + tile, 4:4 + tile], picture[4:4 + tile, 8 + tile:8 + 2 * tile]
    bottom_left = picture[8 + tile:8 + 2 * tile, 4:4 + tile]
    assert top_left[0, 0] == 40 and top_right[0, 0] == 120  # samples 1 and 3, the first two poisoned
    assert top_left[-1, -1] == 0 and bottom_left[-1, -1] == 255 and bottom_left[0, 0] == 40
    assert save_poisoned_examples(ImageSet(originals, torch.zeros(6, dtype=torch.long)), None, tmp_path / "x") == {}


def test_end_to_end_then_cache_reuse(tmp_path: Path) -> None:
    first = bdlab_run(tmp_path, "attack.poison_rate=0.2", "attack.patch_size=4", "logger=csv", run_dir="one")
    assert first.returncode == 0, first.stderr[-2000:]
    results = json.loads((tmp_path / "one" / "results.json").read_text())
    assert results["status"] == "ok"
    assert (results["dataset"], results["model"], results["attack"], results["defense"]) == \
        ("synthetic", "lenet", "badnets", "none")
    metrics = results["metrics"]
    assert set(metrics) >= {"clean/acc", "trojan/acc", "trojan/asr", "trojan/tmc", "trojan/ccc", "attack/cad"}
    assert metrics["attack/cad"] == pytest.approx(metrics["clean/acc"] - metrics["trojan/acc"])
    assert metrics["trojan/acc"] > 80 and metrics["trojan/asr"] > 80
    # a 4x4 patch on 16x16 images: a visible change, far below a blend's PSNR cap
    assert 5 < metrics["attack/psnr"] < 40 and 0 < metrics["attack/ssim"] < 1 and metrics["attack/linf"] > 0
    assert results["config"]["attack"]["poison_rate"] == 0.2 and results["seed"] == 0
    assert results["versions"]["torch"] and "total_s" in results["timings"]
    assert not results["artifacts"]["clean_model"]["reused"]
    assert "trojan/asr" in first.stdout
    assert (tmp_path / "one" / "trigger_examples.png").is_file()
    assert (tmp_path / "one" / "poisoned_examples.png").is_file()
    csv_files = list((tmp_path / "one" / "csv").rglob("metrics.csv"))
    assert csv_files and "trojan/asr" in csv_files[0].read_text()

    second = bdlab_run(tmp_path, "attack.poison_rate=0.2", "attack.patch_size=4", run_dir="two")
    assert second.returncode == 0, second.stderr[-2000:]
    again = json.loads((tmp_path / "two" / "results.json").read_text())
    assert again["artifacts"]["clean_model"]["reused"] and again["artifacts"]["trojan_model"]["reused"]
    assert "reusing cached models/clean" in second.stdout + second.stderr
    assert again["metrics"] == metrics

    # a truncated cache entry: one warning line, the model is rebuilt, the figures are the same
    trojan_entry = Path(again["artifacts"]["trojan_model"]["path"]) / "tensors.safetensors"
    trojan_entry.write_bytes(trojan_entry.read_bytes()[:1000])
    third = bdlab_run(tmp_path, "attack.poison_rate=0.2", "attack.patch_size=4", run_dir="three")
    assert third.returncode == 0, third.stderr[-2000:]
    warnings = [line for line in (third.stdout + third.stderr).splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "is corrupt" in warnings[0], warnings
    rebuilt = json.loads((tmp_path / "three" / "results.json").read_text())
    assert not rebuilt["artifacts"]["trojan_model"]["reused"] and rebuilt["metrics"] == metrics


def test_wandb_offline_logging(tmp_path: Path) -> None:
    result = bdlab_run(tmp_path, "attack=none", "logger=wandb", "trainer.max_epochs=1")
    assert result.returncode == 0, result.stderr[-2000:]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert runs, "W&B must run offline when no credentials are configured"


@pytest.mark.parametrize("override, field", [
    ("trainer.max_epochs=-1", "trainer.max_epochs"),
    ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("model.batch_size=0", "model.batch_size"),
    ("optimizer.lr=-1", "optimizer.lr"),
    ("seed=abc", "seed"),
    ("trainer.precision=banana", "trainer.precision"),
    ("trainer.devices=0", "trainer.devices"),
    ("trainer.accelerator=quantum", "trainer.accelerator"),
    ("trainer.strategy=banana", "trainer"),
    ("scheduler.T_max=abc", "scheduler.T_max"),
    ("optimizer.momentum=-2", "optimizer"),
])
def test_a_bad_training_recipe_is_refused_before_anything_is_loaded(override: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, override]))
    assert info.value.field == field and "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, field", [
    (["attack.poison_rate=1.5"], "attack.poison_rate"),
    (["attack.target_class=-1"], "attack.target_class"),
    (["attack.patch_size=17"], "attack.patch_size"),
    (["attack.position=[15,15]"], "attack.position"),
    (["attack=blended", "attack.alpha=1.2"], "attack.alpha"),
    (["attack=blended", "attack.pattern_file=/no/such.png"], "attack.pattern_file"),
    (["attack.pattern_file=/no/such.png"], "attack.pattern_file"),
    (["model=vgg16_bn"], "model"),
])
def test_bad_values_are_refused_before_training(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, *overrides]))
    assert str(info.value).startswith(field)


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "svhn", "gtsrb"])
def test_absent_dataset_offline_is_refused(dataset: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([f"dataset={dataset}", "dataset.download=false", "logger=none"]))
    assert str(info.value).startswith("dataset:") and "\n" not in str(info.value)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


# the tiny run holds out 90 clean images; these defenses ask for more by default
HELD_OUT_SHARES = {"defense=neo": ["defense.num_samples=50"],
                   "defense=sentinet": ["defense.num_overlays=30", "defense.boundary_images=50"],
                   "defense=hardening": ["defense.distance_images=10"]}


@pytest.mark.parametrize("group", ["dataset", "model", "attack", "defense", "trainer", "logger", "analysis"])
def test_every_option_composes(group: str) -> None:
    for option in options(group):
        cfg = compose_config([f"{group}={option}"])
        assert group in cfg or group in ("logger", "analysis")


@pytest.mark.parametrize("group", ["attack", "defense"])
def test_every_attack_and_defense_option_prepares(group: str, tmp_path: Path) -> None:
    """Every shipped attack and defense builds and validates against data (a typo in a config fails here)."""
    from bdlab.models.weights import save_weights

    for option in options(group):
        overrides = [*TINY_RUN, "dataset.defense_fraction=0.3", f"{group}={option}"]
        if option == "given":  # the given model: any LeNet for the tiny run's 16x16 images
            given = save_weights(prepare(compose_config(TINY_RUN)).services.new_model(), tmp_path / "given.safetensors")
            overrides.append(f"model.weights={given}")
        cfg = compose_config(overrides)
        # the tiny run holds out 90 images, not 500: shrink an inspection defense's (or its nested inspector's) share
        for prefix, node in ((group, cfg[group]), (f"{group}.inspector", cfg[group].get("inspector"))):
            if node is not None and "evaluation_images" in node:
                overrides += [f"{prefix}.optimisation_images=50", f"{prefix}.evaluation_images=40"]
        overrides += HELD_OUT_SHARES.get(f"{group}={option}", [])
        if group == "attack" and option == "issba":  # 16x16 carries 32 bits, and the encoder trains in setup
            overrides += [f"attack.{key}={value}" for key, value in TINY_ENCODER.items()]
        cfg = compose_config(overrides)
        built = getattr(prepare(cfg), group)
        assert f"{type(built).__module__}.{type(built).__name__}".endswith(cfg[group]._target_.split(".")[-1])


def test_every_experiment_prepares() -> None:
    """The reproduction configs compose, and their attacks and defenses validate against the data they name."""
    for option in options("experiment"):
        experiment = prepare(compose_config([f"+experiment={option}", "logger=none"]))
        assert experiment.data.train.images.shape[0] > 0
    lc = prepare(compose_config(["+experiment=label_consistent_mnist", "logger=none"])).attack
    assert (lc.surrogate, lc.ensemble_size, lc.perturbation_region, lc.epsilon) == ("ensemble", 8, "foreground", 0.3)


@pytest.mark.parametrize("option", ["lenet", "resnet18", "preact_resnet18"])
def test_models_instantiate_on_synthetic_rgb(option: str) -> None:
    cfg = compose_config([*TINY_RUN, "dataset.channels=3", "dataset.size=32", f"model={option}"])
    experiment = prepare(cfg)
    assert experiment.services.new_model()(experiment.data.test.images[:2].float() / 255).shape == (2, 10)


def test_cache_keys_ignore_where_things_live() -> None:
    from bdlab.services import model_spec

    a = compose_config([*TINY_RUN, "attack=refool", "cache_dir=/tmp/a", "data_dir=/tmp/x"])
    b = compose_config([*TINY_RUN, "attack=refool", "cache_dir=/tmp/b", "data_dir=/tmp/y"])
    assert model_spec(a, with_attack=True) == model_spec(b, with_attack=True)
