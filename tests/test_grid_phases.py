"""Two-phase grids: one ``-m`` command builds each model first, in a job of its own, then runs the cells, which
find them cached; a dry run counts the work and launches nothing; a failed artifact job fails its cells only."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bdlab.reporting.collect import collect
from bdlab.run import cli
from bdlab.sweeping.plan import CellComposer, is_defense_axis
from tests.sweep_helpers import isolated_env, results

# the session-wide tiny_sweep fixture (its batch-size-0 cells fail), shared with the other sweep tests
pytest_plugins = ["tests.sweep_helpers"]

REPO = Path(__file__).resolve().parent.parent
# 2 attacks x 2 defenses on a few hundred 16x16 images, one epoch: 1 clean + 2 trojaned models, 4 cells
TINY = ["dataset=synthetic", "dataset.channels=1", "dataset.size=16", "dataset.train_size=300",
        "dataset.test_size=300", "model=lenet", "trainer.max_epochs=1", "trainer.accelerator=cpu", "logger=none"]
GRID = ["attack=badnets,blended", "defense=none,flip"]


def artifact_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    return [json.loads((sweep_dir / "artifacts" / str(n) / "results.json").read_text())
            for n in range(len(list((sweep_dir / "artifacts").iterdir())))]


def cache_files(cache: Path) -> list[str]:
    return sorted(str(path.relative_to(cache)) for path in cache.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def two_phase_grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("two_phase")
    command = [sys.executable, "-m", "bdlab.run", "-m", "+sweep=smoke", *TINY, *GRID, f"hydra.sweep.dir={tmp / 'sweep'}"]
    done = subprocess.run(command, cwd=tmp, env=isolated_env(tmp, tmp / "cache"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, done


def test_models_are_built_first_one_job_each_then_the_cells_reuse_them(
        two_phase_grid: tuple[Path, subprocess.CompletedProcess]) -> None:
    tmp, done = two_phase_grid
    jobs = artifact_jobs(tmp / "sweep")
    # phase 1: 1 clean + 2 trojaned models, the clean one first (the others may build on it)
    assert [(job["job"], job["status"], job["artifact"]["kind"]) for job in jobs] == \
        [("artifact", "ok", "clean"), ("artifact", "ok", "trojan"), ("artifact", "ok", "trojan")]
    assert sorted(job["attack"] for job in jobs[1:]) == ["badnets", "blended"]
    for job in jobs:  # each job trained its model (nothing was cached) and recorded the seconds it took
        (record,) = job["artifacts"].values()
        assert record["reused"] is False and Path(record["path"]).name == job["artifact"]["key"]
        assert job["timings"][f"{job['artifact']['kind']}_train_s"] > 0
    # phase 2: the 4 cells, numbered as the grid, every model read from the cache
    cells = results(tmp / "sweep")
    assert sorted(cells) == ["badnets/flip/128", "badnets/none/128", "blended/flip/128", "blended/none/128"]
    for cell in cells.values():
        assert cell["status"] == "ok" and "job" not in cell
        assert cell["artifacts"]["clean_model"]["reused"] and cell["artifacts"]["trojan_model"]["reused"]
        assert "clean_train_s" not in cell["timings"] and "trojan_train_s" not in cell["timings"]
    trojans = {job["attack"]: job["artifact"]["path"] for job in jobs[1:]}
    assert {cell["artifacts"]["trojan_model"]["path"] for cell in cells.values() if cell["attack"] == "badnets"} == \
        {trojans["badnets"]}
    # every model trained exactly once, all of them before the first cell ran
    log = done.stdout + done.stderr
    assert log.count("training the clean model") == 1 and log.count("training the trojan model") == 2
    assert done.stdout.rindex("built the trojaned model") < done.stdout.index("results: ")
    cache = tmp / "cache" / "models"
    assert len(list((cache / "clean").glob("*/tensors.safetensors"))) == 1
    assert len(list((cache / "trojan").glob("*/tensors.safetensors"))) == 2
    assert "cells 4 ok; artifact jobs 3 ok; trained 3 models (1 clean + 2 trojan), reused 0 cached" in done.stdout
    # the report reads the cells only: an artifact job is neither a run nor an unfinished job
    found = collect([tmp / "sweep"])
    assert len(found.records) == 4 and not found.unfinished and not found.problems


def test_a_grid_run_again_into_its_directory_runs_only_the_cells_that_did_not_finish(
        two_phase_grid: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> None:
    grid_tmp, _ = two_phase_grid
    sweep = tmp_path / "sweep"
    shutil.copytree(grid_tmp / "sweep", sweep)
    broken = json.loads((sweep / "2" / "results.json").read_text())
    (sweep / "2" / "results.json").write_text(json.dumps({**broken, "status": "failed", "metrics": {}}))
    kept = {n: (sweep / str(n) / "results.json").stat().st_mtime_ns for n in (0, 1, 3)}
    command = [sys.executable, "-m", "bdlab.run", "-m", "+sweep=smoke", *TINY, *GRID, f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(command, cwd=tmp_path, env=isolated_env(tmp_path, grid_tmp / "cache"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"bdlab: resuming {sweep}: 3 of its 4 cells finished before and are kept" in done.stdout
    assert "phase 1" not in done.stdout  # its models are cached
    assert json.loads((sweep / "2" / "results.json").read_text())["status"] == "ok"
    assert {n: (sweep / str(n) / "results.json").stat().st_mtime_ns for n in (0, 1, 3)} == kept
    assert "cells 4 ok; artifact jobs 3 ok;" in done.stdout


def dry_run(monkeypatch: pytest.MonkeyPatch, *overrides: str) -> int | None:
    """``python -m bdlab.run -m +sweep=smoke ... +dry_run=true`` in this process (Hydra's logging left alone)."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # what cli() sets, undone after the test
    monkeypatch.setattr(sys, "argv", ["bdlab.run", "-m", "+sweep=smoke", *overrides, "+dry_run=true",
                                      "hydra/job_logging=none", "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as stop:
        cli()
        sys.exit(0)
    return stop.value.code


def test_a_dry_run_counts_cells_artifacts_and_time_and_launches_nothing(
        two_phase_grid: tuple[Path, subprocess.CompletedProcess], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    grid_tmp, _ = two_phase_grid
    monkeypatch.setenv("BDLAB_CACHE", str(grid_tmp / "cache"))
    before = cache_files(grid_tmp / "cache")
    code = dry_run(monkeypatch, *TINY, "attack=badnets,blended,wanet", "defense=none,flip,neuron_inspect",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.sweeper.timings={grid_tmp / 'sweep'}")
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith("bdlab: dry run (nothing launched, nothing written): 9 cells")
    assert "artifacts the cells need: 5 distinct (1 clean model, 3 trojaned models, 1 inspection of the clean model)" \
        in lines
    assert "  already cached: 3 (1 clean model, 2 trojaned models)" in lines
    assert "  to build first, one job each: 2 (1 trojaned model, 1 inspection of the clean model)" in lines
    assert any(line.startswith("    [trojan] trojaned model: wanet, lenet on synthetic (seed 0)") for line in lines)
    # estimates from the finished grid: none for wanet's model, the 4 cells it ran (none and flip) have times
    estimate = next(line for line in lines if line.startswith("  phase 2, cells: 9"))
    assert "4 with a time" in estimate and "on 1 worker" in estimate
    assert any(line.startswith("  phase 1, artifacts: 2 job(s), 0 with a time") for line in lines)
    # nothing launched, nothing written: no sweep directory, the cache as it was
    assert not (tmp_path / "sweep").exists() and cache_files(grid_tmp / "cache") == before


def test_a_dry_run_without_earlier_timings_says_where_to_find_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    code = dry_run(monkeypatch, *TINY, *GRID, f"hydra.sweep.dir={tmp_path / 'grids' / 'this'}")
    out = capsys.readouterr().out
    assert code == 0 and "4 cells" in out.splitlines()[0]
    assert "  to build first, one job each: 3 (1 clean model, 2 trojaned models)" in out.splitlines()
    assert f"estimated time: no earlier timings (0 earlier results.json under {tmp_path / 'grids'})" in out
    assert not (tmp_path / "grids").exists() and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("argv, words", [
    (["-m", "+sweep=nosuch", "+dry_run=true"], "bdlab: invalid config: sweep: no option 'nosuch'; valid: "),
    (["+dry_run=true"], "bdlab: +dry_run=true counts the work of a grid: give -m"),
    (["-m", "+sweep=smoke", "+dry_run=true", "hydra.sweeper.timings=nowhere.json"],
     "bdlab: invalid config: hydra.sweeper.timings: nowhere.json: is neither a sweep directory nor a timings file"),
], ids=["unknown sweep", "without -m", "timings not found"])
def test_a_bad_dry_run_is_one_line_and_exit_2(argv: list[str], words: str, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["bdlab.run", *argv, f"hydra.sweep.dir={tmp_path / 'sweep'}",
                                      f"hydra.run.dir={tmp_path / 'run'}", "hydra/job_logging=none",
                                      "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as stop:
        cli()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith(words), lines
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "run").exists()


def test_a_failed_artifact_job_fails_its_cells_with_its_error_and_the_grid_goes_on(
        tiny_sweep: tuple[Path, subprocess.CompletedProcess]) -> None:
    sweep_dir, done = tiny_sweep
    jobs = artifact_jobs(sweep_dir)
    failed_jobs = {str(sweep_dir / "artifacts" / str(n)): job for n, job in enumerate(jobs) if job["status"] == "failed"}
    # batch size 0: its clean and two trojaned models fail validation; batch size 128's three are built
    assert len(failed_jobs) == 3 and sum(job["status"] == "ok" for job in jobs) == 3
    cells = results(sweep_dir)
    for key, cell in cells.items():
        if key.endswith("/0"):
            error = cell["error"]
            job = failed_jobs[error["artifact_job"]]
            assert cell["status"] == "failed" and error["message"] == job["error"]["message"]
            assert error["type"] == "ConfigError" and error["artifact"] == job["artifact"]["label"]
        else:
            assert cell["status"] == "ok"
    assert "cells 6 failed, 6 ok; artifact jobs 3 failed, 3 ok;" in done.stdout


@pytest.mark.parametrize("cells, compositions", [
    # plain attack and defense choices grafted onto one composition per seed; unlearning (an option with a
    # defaults list of its own) composed with each seed
    ([[f"attack={a}", f"defense={d}", f"seed={s}", "dataset=synthetic"] for a, d, s in (
        ("wanet", "strip", 0), ("badnets", "neural_cleanse", 3), ("badnets", "unlearning", 0), ("wanet", "unlearning", 3))],
     4),
    # a field set for every cell's defense: the options' files alone are not the nodes, so cells are whole
    ([[f"defense={d}", "defense.epochs=7"] for d in ("neural_cleanse", "tabor")], 2),
], ids=["grafted", "whole"])
def test_cells_are_composed_from_few_compositions_and_match_hydra(cells: list[list[str]], compositions: int) -> None:
    """Each cell's config and resolved defense node are the ones Hydra composes for the cell whole (``seed``
    reaches the defense's ``${seed}``), from fewer compositions than cells."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from bdlab.compose import CONFIG_DIR

    calls: list[list[str]] = []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        def composed(overrides: list[str]) -> Any:
            calls.append(overrides)
            return compose("config", overrides=overrides, return_hydra_config=True)

        composer = CellComposer(composed, cells)
        for index, cell in enumerate(cells):
            whole = compose("config", overrides=cell, return_hydra_config=True)
            with composer.config(index) as (cfg, defense, names):
                assert defense == OmegaConf.to_container(whole.defense, resolve=True), cell
                for node in ("attack", "dataset", "model", "trainer"):
                    assert OmegaConf.to_container(cfg[node], resolve=True) == \
                        OmegaConf.to_container(whole[node], resolve=True), (cell, node)
                assert names == {"dataset": whole.hydra.runtime.choices.dataset, "model": str(whole.model.name),
                                 "attack": whole.hydra.runtime.choices.attack,
                                 "defense": whole.hydra.runtime.choices.defense}
    assert len(calls) == compositions
    assert [is_defense_axis(e) for e in ("defense=strip", "+defense.epochs=2", "attack=wanet", "defenses=x")] == \
        [True, True, False, False]
