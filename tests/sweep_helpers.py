"""Running bdlab multiruns from tests: the tiny synthetic grid in a subprocess, and a shared sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_RUN

REPO = Path(__file__).resolve().parent.parent


def isolated_env(tmp: Path, cache: Path) -> dict[str, str]:
    """An environment like conftest's isolated one, for subprocesses started outside a test function.

    One thread per process: joblib's workers get one each (cores / workers), and float sums in
    another thread count would round differently, so sequential and parallel grids could only be
    compared approximately.
    """
    return {**os.environ, "PYTHONPATH": str(REPO), "BDLAB_CACHE": str(cache), "BDLAB_DATA": str(tmp / "data"),
            "WANDB_MODE": "offline", "WANDB_DIR": str(tmp / "wandb"), "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def multirun(tmp: Path, sweep_dir: Path, *overrides: str, cache: Path | None = None,
             timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m bdlab.run -m +sweep=smoke <TINY_RUN> <overrides>`` writing into ``sweep_dir``."""
    command = [sys.executable, "-m", "bdlab.run", "-m", "+sweep=smoke", *TINY_RUN, *overrides,
               f"hydra.sweep.dir={sweep_dir}"]
    return subprocess.run(command, cwd=tmp, env=isolated_env(tmp, cache or tmp / "cache"), capture_output=True,
                          text=True, timeout=timeout)


def results(sweep_dir: Path) -> dict[str, dict[str, Any]]:
    """Each job's results.json keyed by ``attack/defense/batch size``."""
    found = {}
    for path in sorted(sweep_dir.glob("*/results.json")):
        payload = json.loads(path.read_text())
        found[f"{payload['attack']}/{payload['defense']}/{payload['config']['model']['batch_size']}"] = payload
    return found


# the smoke grid (badnets, blended, none x none, flip), 2 epochs, with a batch-size axis whose 0
# makes its 6 cells fail validation: failed cells next to successes, for every consumer
GRID = ("trainer.max_epochs=2", "model.batch_size=128,0")


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The grid above, run sequentially once for the whole session: (sweep dir, the finished process)."""
    tmp = tmp_path_factory.mktemp("tiny_sweep")
    done = multirun(tmp, tmp / "sweep", *GRID)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp / "sweep", done
