"""The makespan simulator (``python -m bdlab.bench grid``) on hand-built timings whose optimum is known, the
timings it reads from a finished grid's results.json files, and its bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bdlab.bench_grid import main as bench_grid
from bdlab.sweeping.simulate import artifact_order, lower_bound, one_phase, two_phase, without_barrier
from bdlab.sweeping.timings import FORMAT, ArtifactTime, CellTime, GridTimings, from_results, load_timings_file


def grid(artifacts: dict[str, tuple[str, float, tuple[str, ...]]], cells: list[tuple[float, tuple[str, ...]]]) \
        -> GridTimings:
    return GridTimings({key: ArtifactTime(kind, key, seconds, needs) for key, (kind, seconds, needs) in artifacts.items()},
                       [CellTime(f"cell{i}", seconds, needs) for i, (seconds, needs) in enumerate(cells)])


def test_four_equal_jobs_on_two_workers_take_two_units_the_bound() -> None:
    timings = grid({}, [(1.0, ())] * 4)
    assert lower_bound(timings, 2) == 2.0
    assert one_phase(timings, 2).makespan == two_phase(timings, 2).makespan == 2.0
    assert one_phase(timings, 1).makespan == 4.0 and one_phase(timings, 8).makespan == 1.0


def test_a_chain_model_then_cell_is_the_bound() -> None:
    timings = grid({"m": ("clean", 3.0, ())}, [(1.0, ("m",)), (1.0, ("m",))])
    assert lower_bound(timings, 2) == 4.0  # the chain, not the 5 s of work over 2 workers
    before, after = one_phase(timings, 2), two_phase(timings, 2)
    assert before.makespan == 4.0 and before.waited == 3.0  # the second cell holds its worker while the first trains
    assert after.makespan == 4.0 and after.phase_one == 3.0 and after.waited == 0.0


def test_two_rows_one_phase_trains_them_one_after_the_other_two_phases_side_by_side() -> None:
    # launch order: row a's cells, then row b's; each row's first cell trains its model, the other waits
    timings = grid({"a": ("trojan", 4.0, ()), "b": ("trojan", 4.0, ())},
                   [(1.0, ("a",)), (1.0, ("a",)), (1.0, ("b",)), (1.0, ("b",))])
    assert lower_bound(timings, 2) == 6.0
    before, after = one_phase(timings, 2), two_phase(timings, 2)
    assert before.makespan == 10.0 and before.waited == 8.0
    assert after.makespan == 6.0 and after.phase_one == 4.0


def test_without_the_barrier_cells_that_need_nothing_long_run_beside_a_long_artifact() -> None:
    # a 6 s artifact that one short cell needs; six 1 s cells that need nothing else
    timings = grid({"slow": ("autoencoder", 6.0, ())}, [(1.0, ())] * 6 + [(0.5, ("slow",))])
    assert lower_bound(timings, 2) == 6.5  # the chain: 6 s of work per worker is less
    assert two_phase(timings, 2).makespan == 6.0 + 3.5  # everything waits for the slow artifact
    overlap = without_barrier(timings, 2)
    assert overlap.makespan == 6.5 and overlap.waited == 0.0


def test_cells_go_longest_first_in_the_second_phase() -> None:
    timings = grid({}, [(1.0, ())] * 4 + [(4.0, ())])
    assert lower_bound(timings, 2) == 4.0
    assert one_phase(timings, 2).makespan == 6.0  # the long cell last, in launch order
    assert two_phase(timings, 2).makespan == 4.0


def test_an_inspection_waits_for_the_clean_model_it_is_built_from() -> None:
    artifacts = {"clean": ("clean", 2.0, ()), "inspection": ("inspection", 3.0, ("clean",)),
                 "trojan": ("trojan", 1.0, ())}
    timings = grid(artifacts, [(1.0, ("clean", "trojan", "inspection"))])
    assert artifact_order(list(timings.artifacts), timings.artifacts) == ["inspection", "clean", "trojan"]
    # its job starts first and trains the clean model itself; the clean job then finds it being built
    after = two_phase(timings, 2)
    assert after.phase_one == 5.0 and after.makespan == 6.0 == lower_bound(timings, 2)
    # without a measured time, what others are built from goes first
    assert artifact_order(["inspection", "trojan", "clean"], timings.artifacts, unknown={"inspection", "trojan",
                                                                                          "clean"}) == \
        ["clean", "trojan", "inspection"]


def timings_file(path: Path, cells: list[float], model: float) -> Path:
    payload = {"format": FORMAT, "notes": "hand-built",
               "artifacts": {"m": {"kind": "clean", "label": "the model", "seconds": model, "needs": []}},
               "cells": [{"name": f"c{i}", "seconds": s, "needs": ["m"]} for i, s in enumerate(cells)]}
    path.write_text(json.dumps(payload))
    return path


def test_the_benchmark_writes_each_makespan_and_its_ratio_to_the_bound(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    source = timings_file(tmp_path / "t.json", [1.0, 1.0, 1.0, 1.0], 2.0)
    out = tmp_path / "grid.md"
    assert bench_grid([str(source), "--workers", "1,2", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    # 1 worker: 6 s of work, no waiting; 2 workers: bound max(6/2, 2+1) = 3; one phase 2 + 1 + 1 = 4 (the
    # second worker waits 2 s for the model), two phases 2 + 2 = 4
    # without the barrier, a cell starts beside the model job and waits for it: 2 + 1 + 1 = 4 as well
    assert rows == ["| 1 | 6 | 6 | 1.00 | 0 | 6 | 1.00 | 2 | 6 | 1.00 |",
                    "| 2 | 3 | 4 | 1.33 | 2 | 4 | 1.33 | 2 | 4 | 1.33 |"]
    assert "2 workers, 1.33x: phase 1 lasts 2 s for 2 s of work" in out.read_text()
    assert "4 cells, 1 artifacts, 6 s of work; the longest chain 3 s" in capsys.readouterr().out


@pytest.mark.parametrize("make, workers, words", [
    (lambda tmp: tmp, "8", "holds no results.json"),
    (lambda tmp: tmp / "missing", "8", "is neither a sweep directory nor a timings file"),
    (lambda tmp: timings_file(tmp / "t.json", [1.0], 1.0), "0", "--workers: got '0'"),
    (lambda tmp: timings_file(tmp / "t.json", [1.0], 1.0), "8,x", "--workers: got '8,x'"),
    (lambda tmp: timings_file(tmp / "t.json", [-1.0], 1.0), "8", "c0 has seconds -1.0"),
], ids=["no results", "missing", "zero workers", "not a number", "negative seconds"])
def test_bad_input_is_one_line_and_exit_2(make, workers: str, words: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    source = make(tmp_path)
    out = tmp_path / "out" / "grid.md"
    assert bench_grid([str(source), "--workers", workers, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bdlab: invalid input: ") and words in lines[0], lines
    assert not out.exists()


def write_results(folder: Path, payload: dict, overrides: list[str]) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(payload))
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {item}\n" for item in overrides))


def test_timings_from_a_one_phase_grid_take_each_build_out_of_the_cell_that_did_it(tmp_path: Path) -> None:
    """A cell that trained a model (``reused`` false) gives its time and keeps its other stages as its own; a cell
    that waited for it keeps its stages, not the wait; keys are those the planner derives from the same config."""
    from omegaconf import OmegaConf

    from bdlab.compose import compose_config
    from bdlab.sweeping.plan import cell_artifacts
    from bdlab.cache import ArtifactCache
    from tests.conftest import TINY_RUN

    config = OmegaConf.to_container(compose_config([*TINY_RUN, "defense=flip"]), resolve=True)
    names = {"dataset": "synthetic", "model": "lenet", "attack": "badnets", "defense": "flip"}
    first = {"status": "ok", **names, "config": config, "metrics": {},
             "artifacts": {"clean_model": {"path": "c", "reused": False}, "trojan_model": {"path": "t", "reused": False}},
             "timings": {"data_load_s": 2.0, "clean_train_s": 5.0, "trojan_train_s": 8.0, "poison_s": 1.0,
                         "evaluate_s": 3.0, "defense_s": 1.0, "total_s": 20.5}}
    # it waited 12 s on the cache lock while the first cell trained the models: not work of its own
    second = {**first, "artifacts": {"clean_model": {"path": "c", "reused": True}, "trojan_model": {"path": "t",
                                                                                                  "reused": True}},
              "timings": {"data_load_s": 2.0, "evaluate_s": 3.0, "defense_s": 2.5, "total_s": 19.5}}
    write_results(tmp_path / "0", first, ["attack=badnets", "defense=flip"])
    write_results(tmp_path / "1", second, ["attack=badnets", "defense=flip", "seed=0"])
    timings = from_results([tmp_path / "0" / "results.json", tmp_path / "1" / "results.json"])
    clean, trojan = cell_artifacts(OmegaConf.create(config), config["defense"], names, ArtifactCache(tmp_path))
    assert {key: (a.kind, a.seconds) for key, a in timings.artifacts.items()} == \
        {clean.key: ("clean", 5.0), trojan.key: ("trojan", 9.0)}
    assert [(c.name, c.seconds, c.needs, c.overrides) for c in timings.cells] == [
        ("badnets/flip", 6.0, (clean.key, trojan.key), ("attack=badnets", "defense=flip")),
        ("badnets/flip", 7.5, (clean.key, trojan.key), ("attack=badnets", "defense=flip", "seed=0"))]
    # a two-phase grid's artifact job: its data loading and its own build
    job = {"status": "ok", "job": "artifact", **names, "config": config,
           "artifact": {"kind": "clean", "key": clean.key, "label": "the clean model", "needs": []},
           "timings": {"data_load_s": 2.0, "clean_train_s": 4.0, "build_s": 4.5, "total_s": 30.0}}
    write_results(tmp_path / "artifacts" / "0", job, [])
    again = from_results([tmp_path / "artifacts" / "0" / "results.json", tmp_path / "0" / "results.json"])
    assert again.artifacts[clean.key].seconds == 6.5 and again.cells[0].seconds == 6.0
    # a timings file written from them reads back the same
    path = tmp_path / "timings.json"
    path.write_text(json.dumps(timings.to_json()))
    assert load_timings_file(path).to_json() == timings.to_json()
