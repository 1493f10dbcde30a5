"""Launchers: joblib workers give the sequential numbers, failing cells included; submitit runs a
grid; parallel jobs on a multi-GPU machine each hold a GPU of their own."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bdlab.sweeping.devices import claim_gpu
from tests.sweep_helpers import GRID, multirun, results

# the session-wide tiny_sweep fixture, shared with the other sweep tests (one run for all)
pytest_plugins = ["tests.sweep_helpers"]


def measured(run: dict) -> dict[str, float]:
    """The metrics less running times (``..._ms``, ``..._s``), which no two runs share."""
    return {k: v for k, v in run["metrics"].items() if not k.endswith(("_ms", "_s"))}


def test_joblib_with_two_workers_matches_sequential(tiny_sweep: tuple[Path, subprocess.CompletedProcess],
                                                    tmp_path: Path) -> None:
    sequential_dir, _ = tiny_sweep
    # a fresh cache: the workers train the models themselves, side by side
    done = multirun(tmp_path, tmp_path / "sweep", *GRID, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert done.returncode == 0, done.stderr[-3000:]
    parallel, sequential = results(tmp_path / "sweep"), results(sequential_dir)
    assert sorted(parallel) == sorted(sequential) and len(parallel) == 12
    for cell, run in parallel.items():
        assert run["status"] == sequential[cell]["status"], cell
        assert measured(run) == measured(sequential[cell]), cell
    assert sum(run["status"] == "failed" for run in parallel.values()) == 6
    # each model was built once, by its artifact job before the cells, and every cell reused it
    trained = [run["artifacts"]["clean_model"] for run in parallel.values() if run["status"] == "ok"]
    assert all(artifact["reused"] for artifact in trained)
    assert len(list((tmp_path / "cache" / "models" / "clean").glob("*/tensors.safetensors"))) == 1
    assert len(list((tmp_path / "cache" / "models" / "trojan").glob("*/tensors.safetensors"))) == 2


def test_submitit_local_runs_a_two_cell_grid(tiny_sweep: tuple[Path, subprocess.CompletedProcess],
                                             tmp_path: Path) -> None:
    sequential_dir, _ = tiny_sweep
    # the session sweep's cache holds the models, so the two jobs only evaluate
    done = multirun(tmp_path, tmp_path / "sweep", "trainer.max_epochs=2", "attack=badnets,none", "defense=none",
                    "hydra/launcher=submitit_local", cache=sequential_dir.parent / "cache")
    assert done.returncode == 0, done.stderr[-3000:]
    found, sequential = results(tmp_path / "sweep"), results(sequential_dir)
    assert sorted(found) == ["badnets/none/128", "none/none/128"]
    for cell, run in found.items():
        assert run["status"] == "ok" and run["metrics"] == sequential[cell]["metrics"]
    assert list((tmp_path / "sweep" / ".submitit").iterdir())


def test_parallel_jobs_claim_distinct_gpus(tmp_path: Path) -> None:
    first, held = claim_gpu(tmp_path, count=2, first=0)
    second, other = claim_gpu(tmp_path, count=2, first=0)  # GPU 0 is taken: the next free one
    assert (first, second) == (0, 1)
    held.release()
    third, again = claim_gpu(tmp_path, count=2, first=1)  # GPU 1 still held: 0 is free again
    assert third == 0
    other.release()
    again.release()
