"""Sweeps: one command runs a grid that trains each model once, survives failing cells, and
refuses a bad grid before any job starts."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from omegaconf import DictConfig

from bdlab.compose import CONFIG_DIR
from bdlab.sweeping.callback import SweepCallback, grid_overrides, grid_problems, options
from tests.sweep_helpers import results

# the session-wide tiny_sweep fixture, shared with the other sweep tests (one run for all)
pytest_plugins = ["tests.sweep_helpers"]
from tests.test_run import bdlab_run

CELLS = [f"{a}/{d}" for a in ("badnets", "blended", "none") for d in ("none", "flip")]


def test_grid_trains_each_model_once(tiny_sweep: tuple[Path, subprocess.CompletedProcess]) -> None:
    sweep_dir, done = tiny_sweep
    found = results(sweep_dir)
    assert sorted(key for key in found if key.endswith("/128")) == sorted(f"{cell}/128" for cell in CELLS)
    assert all(found[f"{cell}/128"]["status"] == "ok" for cell in CELLS)
    log = done.stdout + done.stderr
    # 3 attacks x 2 defenses: 2 trojaned models and 1 clean reference, never 6
    assert log.count("training the clean model") == 1 and log.count("training the trojan model") == 2
    assert "trained 3 models (1 clean + 2 trojan)" in done.stdout
    cache = sweep_dir.parent / "cache" / "models"
    assert len(list((cache / "clean").glob("*/tensors.safetensors"))) == 1
    assert len(list((cache / "trojan").glob("*/tensors.safetensors"))) == 2
    assert not list(cache.rglob(".*"))  # no staging directory left behind
    # cells that share a model report its numbers identically
    badnets, defended = found["badnets/none/128"], found["badnets/flip/128"]
    assert badnets["metrics"]["trojan/asr"] == defended["metrics"]["trojan/asr"]
    assert defended["artifacts"]["trojan_model"]["reused"] and "defense/asr" in defended["metrics"]
    assert badnets["artifacts"]["trojan_model"]["path"] == defended["artifacts"]["trojan_model"]["path"]
    assert Path(badnets["artifacts"]["trojan_model"]["path"]).parent == cache / "trojan"
    assert list(sweep_dir.glob("*/trigger_examples.png"))


def test_failing_cells_are_recorded_and_the_grid_goes_on(tiny_sweep: tuple[Path, subprocess.CompletedProcess]) -> None:
    sweep_dir, done = tiny_sweep
    found = results(sweep_dir)
    assert len(found) == 12
    for cell in CELLS:
        failed = found[f"{cell}/0"]
        assert failed["status"] == "failed" and failed["metrics"] == {}
        assert failed["error"]["type"] == "ConfigError"
        assert failed["error"]["message"] == "model.batch_size: got 0, must be >= 1"
        assert "Traceback" in failed["error"]["traceback"] and failed["config"]["model"]["batch_size"] == 0
    assert "cells 6 failed, 6 ok" in done.stdout


def test_single_run_failure_exits_nonzero_and_records_it(tmp_path: Path) -> None:
    done = bdlab_run(tmp_path, "optimizer._target_=tests.failing.DivergingSGD")
    assert done.returncode == 1
    payload = json.loads((tmp_path / "run" / "results.json").read_text())
    assert payload["status"] == "failed" and payload["attack"] == "badnets"
    assert payload["error"]["type"] == "RuntimeError"
    assert "training diverged" in payload["error"]["message"] and "Traceback" in payload["error"]["traceback"]


def sweep_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("sweep", options("sweep"))
def test_every_sweep_file_names_existing_options(sweep: str) -> None:
    cfg = sweep_config(f"+sweep={sweep}")
    assert cfg.hydra.sweeper.params, f"{sweep} has no grid"
    assert grid_problems(cfg) == []


def test_the_trojanzoo_sweep_covers_every_attack_and_every_defense() -> None:
    """TrojanZoo's grid is every attack bdlab has (but ``none``) x every defense, through Hydra's glob sweep
    (expanded here as the basic sweeper does, with the config loader): a new option joins it unedited."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=trojanzoo"], return_hydra_config=True)
        parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
        overrides = parser.parse_overrides(grid_overrides(cfg))
        overrides = [override for override in overrides if override.is_sweep_override()]  # not +sweep=
        grid = {override.key_or_group: list(override.sweep_string_iterator()) for override in overrides}
    assert all(isinstance(override.value(), Glob) for override in overrides)  # not a hand-written list
    assert grid == {"attack": [o for o in options("attack") if o not in ("none", "given")],
                    "defense": options("defense")}


def test_bad_grids_are_refused_with_one_line_each(capsys: pytest.CaptureFixture) -> None:
    cfg = sweep_config("+sweep=smoke")
    cfg.hydra.overrides.task = ["attack=badnets,nosuch", "defense=none,nope"]
    with pytest.raises(SystemExit) as stop:
        SweepCallback().on_multirun_start(cfg)
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"bdlab: invalid sweep: unknown attack option 'nosuch' (available: {', '.join(options('attack'))})",
        f"bdlab: invalid sweep: unknown defense option 'nope' (available: {', '.join(options('defense'))})"]


def test_a_sweep_file_without_axes_is_an_empty_grid() -> None:
    cfg = sweep_config("+sweep=smoke")
    cfg.hydra.sweeper.params = {}
    assert grid_problems(cfg) == ["sweep 'smoke' defines an empty grid: give hydra.sweeper.params at least one axis"]


def test_a_sweep_without_multirun_says_so(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        SweepCallback().on_run_start(sweep_config("+sweep=smoke"))
    assert stop.value.code == 2 and "python -m bdlab.run -m +sweep=smoke" in capsys.readouterr().err


def test_wandb_run_carries_names_params_group_and_trigger_media(tmp_path: Path) -> None:
    from bdlab.compose import compose_config
    from bdlab.run import run_experiment
    from tests.conftest import TINY_RUN

    cfg = compose_config([*TINY_RUN, "logger=wandb", "trainer.max_epochs=1"])
    run_experiment(cfg, tmp_path, group="quick/2026-01-01_00-00-00")
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    # an offline run keeps config, group and history in its .wandb record file until `wandb sync`;
    # W&B's service process writes that file and may still be flushing it when finish() returns
    record_file = next(run_dir.glob("*.wandb"))
    deadline = time.monotonic() + 60
    records = record_file.read_bytes()
    while b"trojan/asr" not in records and time.monotonic() < deadline:
        time.sleep(0.5)
        records = record_file.read_bytes()
    for key, value in [("attack", "badnets"), ("defense", "none"), ("dataset", "synthetic"), ("model", "lenet")]:
        assert f'{key}'.encode() in records and f'"{value}"'.encode() in records
    assert b"attack_params" in records and b"poison_rate" in records and b"trojan/asr" in records
    assert b"quick/2026-01-01_00-00-00" in records  # the sweep as the run's group
    assert list((run_dir / "files" / "media" / "images").glob("media/trigger_examples_*.png"))
    assert (tmp_path / "trigger_examples.png").is_file()
