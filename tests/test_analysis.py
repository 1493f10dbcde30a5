"""Trigger-robustness analyses: files on synthetic data, W&B logging, bad input."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from pytorch_lightning.loggers import WandbLogger

from bdlab.compose import compose_config
from bdlab.errors import ConfigError
from bdlab.loggers import close_loggers
from bdlab.pipeline import execute, prepare
from tests.conftest import TINY_RUN
from tests.test_transforms import shared_cache

ALL = ["trigger_location", "trigger_appearance", "trigger_transform", "image_transform", "shrink_ablation"]


def test_every_analysis_writes_its_files_and_logs_to_wandb(tmp_path: Path, tmp_path_factory) -> None:
    cfg = compose_config([*TINY_RUN, "attack.patch_size=4", "attack.poison_rate=0.2", f"analysis=[{','.join(ALL)}]",
                          "analysis.trigger_location.stride=2", "analysis.trigger_location.max_images=50",
                          "analysis.trigger_transform.max_images=100", "analysis.image_transform.max_images=100",
                          "analysis.trigger_appearance.step=51", f"cache_dir={shared_cache(tmp_path_factory)}"])
    experiment = prepare(cfg)
    wandb = WandbLogger(project="bdlab", offline=True, save_dir=str(tmp_path))
    metrics = execute(experiment, tmp_path / "run", [wandb])["metrics"]
    close_loggers([wandb], "success")  # as the runner does: ends the W&B run, so the next test starts its own
    for name in ALL:
        folder = tmp_path / "run" / name
        assert (folder / f"{name}.csv").stat().st_size > 0 and (folder / f"{name}.png").stat().st_size > 0, name
        assert any(key.startswith(f"analysis/{name}/") for key in metrics), name
    assert metrics["analysis/trigger_location/asr_original"] > 80
    assert metrics["analysis/trigger_location/asr_min"] < 50  # far from its place the patch does nothing
    assert metrics["analysis/shrink_ablation/asr_s0"] == pytest.approx(metrics["trojan/asr"])
    assert metrics["analysis/trigger_appearance/asr_v0"] < metrics["analysis/trigger_appearance/asr_v255"]
    assert metrics["analysis/trigger_transform/rotate_0/asr"] == pytest.approx(metrics["trojan/asr"], abs=5)
    rows = list(csv.DictReader((tmp_path / "run" / "image_transform" / "image_transform.csv").open()))
    assert {r["transform"] for r in rows} == {"translate", "scale", "rotate"}
    assert len([r for r in rows if r["transform"] == "translate" and float(r["parameter"]) == 1]) == 8
    assert set(rows[0]) >= {"asr", "acc", "asr_drop", "error_rate"}
    assert list((tmp_path / "wandb").rglob("*.png")) or list((tmp_path / "wandb").rglob("*.wandb"))


@pytest.mark.parametrize("overrides, field", [
    (["attack=none", "analysis=trigger_location"], "analysis.trigger_location"),
    (["attack=none", "analysis=trigger_appearance"], "analysis.trigger_appearance"),
    (["attack=none", "analysis=trigger_transform"], "analysis.trigger_transform"),
    (["attack=none", "analysis=image_transform"], "analysis.image_transform"),
    (["attack=none", "analysis=shrink_ablation"], "analysis.shrink_ablation"),
    (["attack=blended", "analysis=trigger_location"], "analysis.trigger_location"),
    (["attack=targeted", "analysis=trigger_transform"], "analysis.trigger_transform"),  # placed per image
    (["analysis=shrink_ablation", "analysis.shrink_ablation.sizes=[0,16]"], "analysis.shrink_ablation.sizes"),
    (["analysis=trigger_transform", "analysis.trigger_transform.scales=[0]"], "analysis.trigger_transform.scales"),
    (["analysis=trigger_transform", "analysis.trigger_transform.points=4"], "analysis.trigger_transform.points"),
    (["analysis=trigger_transform", "analysis.trigger_transform.radii=[-1]"], "analysis.trigger_transform.radii"),
    (["analysis=image_transform", "analysis.image_transform.scales=[-0.5]"], "analysis.image_transform.scales"),
    (["analysis=image_transform", "analysis.image_transform.angles=[400]"], "analysis.image_transform.angles"),
    (["analysis=trigger_location", "analysis.trigger_location.stride=0"], "analysis.trigger_location.stride"),
    (["analysis=trigger_appearance", "analysis.trigger_appearance.step=0"], "analysis.trigger_appearance.step"),
])
def test_bad_values_are_refused_before_training(overrides: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        prepare(compose_config([*TINY_RUN, *overrides]))
    assert str(info.value).startswith(field)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf"
                                                                   / "experiment").glob("*.yaml")))
def test_experiments_compose(experiment: str) -> None:
    cfg = compose_config([f"+experiment={experiment}"])
    models = {p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "model").glob("*.yaml")}
    assert cfg.model.name in models and cfg.attack._target_


@pytest.mark.slow
def test_why_is_your_trojan_badnets_curves_on_mnist(tmp_path: Path) -> None:
    """"Why is your Trojan" Fig. 3 for BadNets (5x5 white square, margin 3) on MNIST / LeNet, seeds 0-2."""
    angles = (0, 15, 30, 45, 60, 75, 90)
    mean_rotation = dict.fromkeys(angles, 0.0)
    for seed in (0, 1, 2):
        cfg = compose_config(["+experiment=trojan_transforms_badnets", "analysis=trigger_transform", "logger=none",
                              f"seed={seed}", f"cache_dir={tmp_path}"])
        metrics = execute(prepare(cfg), tmp_path / f"run{seed}", [])["metrics"]
        translate = [metrics[f"analysis/trigger_transform/translate_{r}/asr"] for r in (1, 2, 3)]
        assert translate[0] >= translate[1] >= translate[2]
        for angle in angles:
            mean_rotation[angle] += metrics[f"analysis/trigger_transform/rotate_{angle}/asr"] / 3
    # measured (README): with OMP_NUM_THREADS=1 100/100/94.5/91.6/94.5/100/100 (lowest at 45 in every
    # seed); with 2 threads 100/100/94.3/95.1/95.5/100/100. The dip is the 30-60 band; which of its
    # three angles is lowest is within run-to-run noise (they overlap the original in the same pixels)
    assert max(mean_rotation[a] for a in (30, 45, 60)) < min(mean_rotation[a] for a in (0, 15, 75, 90))
    assert mean_rotation[45] <= min(mean_rotation[30], mean_rotation[60]) + 2
    for low, high in ((0, 90), (15, 75), (30, 60)):
        assert abs(mean_rotation[low] - mean_rotation[high]) < 3
